"""Shared fixtures: the real SmolLM2 weights (ours and transformers', each loaded once per session) and a
tiny byte-level tokenizer for the random test models."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


BYTE_VOCAB = 257  # 256 byte tokens + <|endoftext|>


def write_byte_tokenizer(folder: Path) -> None:
    """A valid byte-level BPE tokenizer.json (id = byte value, no merges) plus <|endoftext|> = 256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    assert tok.get_vocab_size(with_added_tokens=True) == BYTE_VOCAB
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def byte_tokenizer_writer() -> Callable[[Path], None]:
    return write_byte_tokenizer


# ---- the real shipped model ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from lmforge.weights.registry import resolve

    return resolve("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm(smollm_path):
    """(our Transformer in fp32, our Tokenizer) from the GGUF."""
    from lmforge.weights.load import load

    return load(smollm_path, torch.float32)


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_path):
    """Our tokenizer from the GGUF metadata only (no weights dequantized)."""
    from lmforge.tokenizer import Tokenizer
    from lmforge.weights.gguf import metadata, open_gguf

    return Tokenizer.from_gguf(metadata(open_gguf(smollm_path)))


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


@pytest.fixture(scope="session")
def hf_smollm(smollm_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name, dtype=torch.float32)
    return model.eval()


# ---- a small corpus to train on (tests/corpus.py), its three tokenizers and prepared datasets --------------

KINDS = {"clm": ("bpe", 400), "mlm": ("wordpiece", 200), "span": ("unigram", 200)}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from corpus import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def datasets(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """objective -> a prepared dataset tokenised for it (BPE / WordPiece / Unigram with sentinels)."""
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer_train import save_trained, train_tokenizer

    root = tmp_path_factory.mktemp("prepared")
    out = {}
    for objective, (kind, size) in KINDS.items():
        tok = save_trained(train_tokenizer([corpus], kind, vocab_size=size), root / f"tok-{kind}")
        out[objective] = root / f"data-{kind}"
        prepare([corpus], tok, out[objective], val_fraction=0.1, workers=1, progress=False,
                max_top_ngram_fraction=1.0)  # the cycle repeats n-grams on purpose
    return out
