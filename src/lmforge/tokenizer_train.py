"""Train a tokenizer on your own text with HF `tokenizers`: byte-level BPE (decoders, GPT-2 style), WordPiece
(encoders, BERT style) or Unigram (T5 style). The files are streamed line by line, never read whole; the
result is a tokenizer.json that lmforge's Tokenizer and transformers' fast tokenizers both load.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

Kind = Literal["bpe", "wordpiece", "unigram"]

# the special tokens each kind's model family expects, in id order (ids 0, 1, ...)
DEFAULT_SPECIALS: dict[str, list[str]] = {
    "bpe": ["<|endoftext|>"],
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "unigram": ["<pad>", "</s>", "<unk>"],
}
UNIGRAM_SENTINELS = 100  # added after the learned vocabulary, as in T5's 32000 + 100
# which of those fills which role in tokenizer_config.json
ROLES: dict[str, dict[str, str]] = {
    "bpe": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "wordpiece": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"},
    "unigram": {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
}


def _lines(files: list[Path]) -> Iterator[str]:
    """Every line of every file, streamed; a file that is not UTF-8 is an error naming it and the line."""
    for path in files:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise LmforgeError(f"{path} line {number} is not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None


def _check_files(files: list[str | Path]) -> list[Path]:
    if not files:
        raise LmforgeError("no training files given")
    paths = []
    for name in files:
        path = Path(name)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md"))
        elif path.is_file():
            paths.append(path)
        else:
            raise LmforgeError(f"no such file or folder: {name}")
    if not paths:
        raise LmforgeError(f"no .txt or .md files in {', '.join(map(str, files))}")
    return paths


def _pipeline(kind: Kind, specials: list[str], vocab_size: int, min_frequency: int, show_progress: bool) -> tuple[
    HFTokenizer, trainers.Trainer
]:
    """An untrained tokenizer of this kind and the trainer that fills its vocabulary."""
    if kind == "bpe":
        tok = HFTokenizer(models.BPE(fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=show_progress,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no text is ever unknown
        )
        return tok, trainer
    if kind == "wordpiece":
        unk = "[UNK]" if "[UNK]" in specials else specials[0]
        tok = HFTokenizer(models.WordPiece(unk_token=unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=show_progress,
        )
        return tok, trainer  # its [CLS] ... [SEP] template needs the trained ids: set in train_tokenizer
    if kind == "unigram":
        unk = "<unk>" if "<unk>" in specials else specials[-1]
        tok = HFTokenizer(models.Unigram())
        # as sentencepiece's nmt_nfkc: NFKC, and any run of whitespace is one space
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token=unk, show_progress=show_progress,
        )
        return tok, trainer
    raise LmforgeError(f"unknown tokenizer kind {kind!r} (bpe, wordpiece, unigram)")


def train_tokenizer(
    files: list[str | Path], kind: Kind = "bpe", vocab_size: int = 8000, specials: list[str] | None = None,
    min_frequency: int = 2, show_progress: bool = False,
) -> Tokenizer:
    """Train a tokenizer of `kind` on the text files (folders: their .txt/.md files)."""
    if kind not in DEFAULT_SPECIALS:
        raise LmforgeError(f"unknown tokenizer kind {kind!r} (bpe, wordpiece, unigram)")
    specials = list(dict.fromkeys(DEFAULT_SPECIALS[kind] + list(specials or [])))
    if any(not s.strip() for s in specials):
        raise LmforgeError("special tokens must not be empty")
    floor = len(specials) + (256 if kind == "bpe" else 0)
    if not floor < vocab_size <= 1_000_000:
        raise LmforgeError(f"vocab size must be in ({floor}, 1000000] for {kind} with {len(specials)} special "
                           f"tokens, got {vocab_size}")
    paths = _check_files(files)
    backend, trainer = _pipeline(kind, specials, vocab_size, max(min_frequency, 1), show_progress)
    backend.train_from_iterator(_lines(paths), trainer=trainer)
    if backend.get_vocab_size() <= len(specials):
        raise LmforgeError("the training text is empty: no vocabulary was learned")
    if kind == "wordpiece" and {"[CLS]", "[SEP]"} <= set(specials):
        cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    if kind == "unigram":  # T5's span-corruption sentinels, as T5 numbers them: <extra_id_0> is the last id
        backend.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(UNIGRAM_SENTINELS))])
    if kind == "unigram" and "</s>" in specials:  # T5 appends </s> to every input
        backend.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", backend.token_to_id("</s>"))]
        )
    roles = {role: tok for role, tok in ROLES[kind].items() if tok in specials}
    return Tokenizer(backend, bos_token=roles.get("bos_token"), eos_token=roles.get("eos_token"),
                     pad_token=roles.get("pad_token"), unk_token=roles.get("unk_token"),
                     extra_config={k: v for k, v in roles.items() if k in ("cls_token", "sep_token", "mask_token")})


def save_trained(tokenizer: Tokenizer, out: str | Path) -> Path:
    """`x.json`: that tokenizer.json alone; otherwise a folder with tokenizer.json + tokenizer_config.json
    (the special tokens' roles), which `lmforge` and transformers' AutoTokenizer load. Returns the written path."""
    out = Path(out)
    if not str(out).strip():
        raise LmforgeError("empty output path")
    try:
        if out.suffix == ".json":
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tokenizer.backend.save(str(tmp))
            tmp.replace(out)  # never a half-written tokenizer.json
            return out
        tokenizer.save(out)
        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config.update({k: v for k, v in tokenizer.extra_config.items() if k.endswith("_token")})
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return out
    except OSError as e:
        raise LmforgeError(f"cannot write {out}: {e.strerror or e}") from None
