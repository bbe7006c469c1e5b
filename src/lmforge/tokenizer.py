"""Tokenizer: HF `tokenizers` underneath, loaded from tokenizer.json or built from GGUF metadata,
plus the checkpoint's chat template rendered with jinja2 the way transformers renders it."""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LmforgeError

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre(kind: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's `tokenizer.ggml.pre` names -> the equivalent HF pre-tokenizer."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if kind in ("smollm", "starcoder", "refact", "codeshell"):  # digits one by one, then GPT-2's split
        splits = [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        return pre_tokenizers.Sequence(splits)
    pattern = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}.get(kind)
    if pattern is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return pre_tokenizers.Sequence([split, byte_level])


def _valid_utf8(text: str) -> str:
    """Bytes that were not UTF-8 (kept by Python as lone surrogates) become U+FFFD, as a decoder would."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _raise(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.extra_config = extra_config or {}
        self._truncating_backends: dict[int, HFTokenizer] = {}  # max_length -> a copy with truncation on

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, folder: Path) -> Tokenizer:
        path = folder / "tokenizer.json"
        config_path = folder / "tokenizer_config.json"
        try:
            config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
        except (OSError, json.JSONDecodeError) as e:
            raise LmforgeError(f"bad tokenizer_config.json in {folder}: {e}") from None
        try:
            if path.exists():
                backend = HFTokenizer.from_file(str(path))
            elif (folder / "vocab.txt").exists():  # a BERT folder without tokenizer.json
                from tokenizers.implementations import BertWordPieceTokenizer

                lower = bool(config.get("do_lower_case", True))
                backend = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lower)._tokenizer
            else:
                raise LmforgeError(f"no tokenizer.json or vocab.txt in {folder}")
            # some tokenizer.json files (all-MiniLM-L6-v2) ship with fixed padding/truncation switched on;
            # transformers ignores those and so must we: callers pad and truncate explicitly
            backend.no_padding()
            backend.no_truncation()
        except Exception as e:
            if isinstance(e, LmforgeError):
                raise
            raise LmforgeError(f"bad tokenizer in {folder}: {str(e).splitlines()[0]}") from None
        template = config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list) and template:  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])

        def token(key: str) -> str | None:
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value

        return cls(backend, template, token("bos_token"), token("eos_token"), token("pad_token"), token("unk_token"),
                   extra_config={k: config[k] for k in ("model_max_length", "do_lower_case") if k in config})

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise LmforgeError(f"GGUF tokenizer model {kind!r} is not supported yet (supported: gpt2 byte-level BPE)")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _byte_level_pre(str(meta.get("tokenizer.ggml.pre", "default")))
        backend.decoder = decoders.ByteLevel()
        # llama.cpp token types: 3 = control (special), 4 = user-defined (added, not special)
        kinds = list(zip(tokens, types, strict=True))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == 3])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == 4])

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[int(i)] if i is not None and int(i) < len(tokens) else None

        bos = token("bos")
        if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
            bos_id = vocab[bos]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
            )
        else:
            backend.post_processor = processors.ByteLevel(trim_offsets=False)
        return cls(backend, meta.get("tokenizer.chat_template"), bos, token("eos"), token("padding"), token("unknown"),
                   extra_config={"model_max_length": None})

    def save(self, folder: Path, model_max_length: int | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "unk_token": self.unk_token, "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or self.extra_config.get("model_max_length") or 1_000_000,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ---- encode / decode -----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.pad_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(_valid_utf8(text), add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: list[str], max_length: int | None = None, add_special_tokens: bool = True
    ) -> list[list[int]]:
        """Encode many texts at once (threaded in Rust), truncating each to max_length if given."""
        return self.encode_batch_truncated(texts, max_length, add_special_tokens)[0]

    def encode_batch_truncated(
        self, texts: list[str], max_length: int | None = None, add_special_tokens: bool = True
    ) -> tuple[list[list[int]], list[bool]]:
        """encode_batch, also saying which texts lost tokens to max_length (special tokens count too)."""
        backend = self.backend if max_length is None else self._truncating(max_length)
        encodings = backend.encode_batch([_valid_utf8(t) for t in texts], add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings], [bool(e.overflowing) for e in encodings]

    def _truncating(self, max_length: int) -> HFTokenizer:
        # a copy with truncation on, kept: rebuilding it per call costs more than encoding a batch
        cache = self._truncating_backends
        if max_length not in cache:
            backend = HFTokenizer.from_str(self.backend.to_str())
            backend.enable_truncation(max_length)
            cache[max_length] = backend
        return cache[max_length]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------

    @cached_property
    def _template(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        assert self.chat_template is not None
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise LmforgeError(f"bad chat template: {e}") from None

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render a conversation to the prompt text the model was tuned on."""
        if not self.chat_template:
            raise LmforgeError("this model has no chat template; use plain generation without --chat")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise LmforgeError("each chat message needs a 'role' and a 'content'")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                eos_token=self.eos_token or "", **kwargs,
            )
        except Exception as e:  # the template is the checkpoint's code: any failure is its error
            raise LmforgeError(f"chat template error: {e}") from None
