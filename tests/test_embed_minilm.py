"""The shipped all-MiniLM-L6-v2: our embeddings and token ids equal sentence-transformers' on varied text, long
inputs are truncated with a warning, and `lmforge embed` (driven through a parser built here) writes them."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.embed_cli import add_embed_command
from lmforge.embeddings import embed, load_encoder
from lmforge.errors import LmforgeError
from lmforge.weights.registry import resolve

pytestmark = pytest.mark.slow

LONG = " ".join(f"word{i} and some filler text about item number {i}." for i in range(60))  # ~700 tokens
SENTENCES = [
    "The cat sits outside.",
    "A man is playing guitar.",
    "I love pasta.",
    "The new movie is awesome!",
    "Do you like pizza?",
    "",
    LONG,
    "Das Wetter ist heute schön, aber morgen regnet es.",
    "Le café est très chaud ce matin.",
    "¿Dónde está la biblioteca?",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "Emoji test 😀🚀🔥 with symbols ©®™",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name;",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "<div class=\"header\"><a href=\"/home\">Home</a></div>",
    "3.14159 2.71828 1.41421 and 42",
    "Call me at +1 (555) 010-9999 before 10:30pm on 2024-03-15.",
    "The price rose 12.5% to $1,234.56 in Q3.",
    "1 2 3 4 5 6 7 8 9 10",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nmixed",
    "UPPERCASE TEXT SHOULD BE LOWERCASED",
    "naïve café résumé coöperate",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a",
    ".",
    "!!!???...",
    "https://example.com/path?query=1&other=two#frag",
    "user@example.com wrote: thanks!",
    "The quick brown fox jumps over the lazy dog.",
    "Machine learning models learn patterns from data.",
    "Neural networks are loosely inspired by the brain.",
    "Transformers use self-attention to mix information across tokens.",
    "Sentence embeddings map text to vectors for semantic search.",
    "Retrieval-augmented generation grounds answers in documents.",
    "The stock market fell sharply after the announcement.",
    "She sells sea shells by the sea shore.",
    "It was the best of times, it was the worst of times.",
    "To be, or not to be, that is the question.",
    "Photosynthesis converts light energy into chemical energy.",
    "The mitochondria is the powerhouse of the cell.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Paris is the capital of France.",
    "He didn't know what to say, so he said nothing.",
    "[CLS] [SEP] [MASK] look like special tokens",
    "x" * 300,
    "The end.",
]
assert len(SENTENCES) == 50


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    return resolve("minilm-l6")


@pytest.fixture(scope="module")
def st_model(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")


@pytest.fixture(scope="module")
def ours() -> np.ndarray:
    with pytest.warns(UserWarning, match=r"^1 of 50 texts were longer than 256 tokens"):
        return embed(SENTENCES, batch_size=16)


def test_config_from_sentence_transformers_files():
    model, _ = load_encoder("minilm-l6")
    cfg = model.cfg
    assert (cfg.family, cfg.hf_model_type, cfg.d_model, cfg.n_layer) == ("encoder", "bert", 384, 6)
    assert (cfg.pooling, cfg.normalize_embeddings, cfg.truncate_len) == ("mean", True, 256)
    assert load_encoder("minilm-l6") is load_encoder("minilm-l6")  # loaded once per process


def test_token_ids_match_sentence_transformers_and_transformers(minilm_path, st_model):
    from transformers import AutoTokenizer

    _, tok = load_encoder("minilm-l6")
    ids, truncated = tok.encode_batch_truncated(SENTENCES, max_length=256)
    assert truncated == [s == LONG for s in SENTENCES]
    assert ids[SENTENCES.index("")] == [101, 102]  # [CLS] [SEP]
    st_ids = st_model.tokenize(SENTENCES)["input_ids"]
    st_mask = st_model.tokenize(SENTENCES)["attention_mask"]
    assert [row[mask.bool()].tolist() for row, mask in zip(st_ids, st_mask, strict=True)] == ids
    hf = AutoTokenizer.from_pretrained(minilm_path)
    assert hf(SENTENCES, truncation=True, max_length=256)["input_ids"] == ids


def test_embeddings_match_sentence_transformers(ours, st_model):
    ref = st_model.encode(SENTENCES, batch_size=16, convert_to_numpy=True)
    assert ours.shape == ref.shape == (50, 384) and ours.dtype == np.float32
    cosine = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() >= 0.9999, f"worst: {SENTENCES[int(cosine.argmin())]!r} {cosine.min()}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # normalised, as configured


def test_batching_and_order_do_not_change_results(ours):
    reordered = list(reversed(SENTENCES))
    with pytest.warns(UserWarning):
        again = embed(reordered, batch_size=7)
    np.testing.assert_allclose(again[::-1], ours, atol=1e-5, rtol=0)
    single = embed(SENTENCES[3])
    assert single.shape == (1, 384)
    np.testing.assert_allclose(single[0], ours[3], atol=1e-5, rtol=0)


def test_edge_cases():
    empty = embed([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    with pytest.raises(LmforgeError):
        embed([1, 2])  # type: ignore[list-item]
    with pytest.raises(LmforgeError):
        embed(["x"], batch_size=0)


# ---- the command ---------------------------------------------------------------------------------


def run_embed(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lmforge")
    add_embed_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["embed", *argv])
    return args.func(args)


def test_cli_json_to_stdout(ours, capsys):
    assert run_embed(SENTENCES[0], SENTENCES[1]) == 0
    vectors = np.array(json.loads(capsys.readouterr().out), dtype=np.float32)
    np.testing.assert_allclose(vectors, ours[:2], atol=1e-6, rtol=0)


def test_cli_file_to_npy(ours, tmp_path, capsysbinary):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES[:5]) + "\n")  # includes the empty line: row i is line i
    out = tmp_path / "vectors"  # no suffix on purpose: written exactly here
    assert run_embed("--file", str(texts), "--format", "npy", "--output", str(out)) == 0
    np.testing.assert_allclose(np.load(out), ours[:5], atol=1e-6, rtol=0)
    assert run_embed("--file", str(texts), "--format", "npy") == 0  # binary to stdout
    np.testing.assert_allclose(np.load(io.BytesIO(capsysbinary.readouterr().out)), ours[:5], atol=1e-6, rtol=0)


def test_cli_stdin(ours, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(SENTENCES[2] + "\n"))
    assert run_embed("--file", "-") == 0
    np.testing.assert_allclose(np.array(json.loads(capsys.readouterr().out)), ours[2:3], atol=1e-6, rtol=0)


def test_cli_errors(tmp_path, byte_tokenizer_writer):
    with pytest.raises(LmforgeError, match="no such file"):
        run_embed("--file", str(tmp_path / "missing.txt"))
    with pytest.raises(LmforgeError, match="no texts"):
        run_embed()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LmforgeError, match="no texts"):
        run_embed("--file", str(tmp_path / "empty.txt"))
    with pytest.raises(LmforgeError, match="not both"):
        run_embed("hello", "--file", str(tmp_path / "empty.txt"))

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    decoder = LlamaForCausalLM(LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64,
    ))
    decoder.save_pretrained(tmp_path / "decoder")
    byte_tokenizer_writer(tmp_path / "decoder")
    with pytest.raises(LmforgeError, match="decoder-only"):
        run_embed("hello", "--model", str(tmp_path / "decoder"))


def test_vocab_txt_only_folder_tokenizes_like_transformers(tmp_path):
    """A BERT folder with vocab.txt but no tokenizer.json still gets the same WordPiece ids."""
    import shutil

    from transformers import AutoTokenizer

    from lmforge.tokenizer import Tokenizer
    from lmforge.weights.registry import resolve

    src = resolve("minilm-l6")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    ours = Tokenizer.from_dir(tmp_path)
    full = Tokenizer.from_dir(src)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Hello, World!", "Tokenisation of CAFÉ naïve 東京", "don't   stop\tbelieving 12345", ""]
    for text in texts:
        assert ours.encode(text) == full.encode(text) == theirs(text).input_ids
    assert ours.encode_batch(["a " * 400], max_length=256)[0] == theirs("a " * 400, truncation=True,
                                                                       max_length=256).input_ids


def test_exported_encoder_keeps_pooling_normalisation_and_limit(tmp_path):
    """An export carries the sentence-transformers files, so the copy embeds exactly like the original."""
    import numpy as np

    from lmforge.embeddings import embed, load_encoder
    from lmforge.weights.load import export_hf

    model, tok = load_encoder("minilm-l6")
    export_hf(model, tok, tmp_path / "copy")
    texts = ["A short sentence.", "word " * 400]
    with pytest.warns(UserWarning, match="truncated"):
        original = embed(texts)
    with pytest.warns(UserWarning, match="truncated"):
        copied = embed(texts, model=str(tmp_path / "copy"))
    np.testing.assert_allclose(copied, original, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(copied, axis=1), 1.0, atol=1e-5)
