"""Tokenizer training: each kind learns a vocabulary from streamed files, loads in lmforge and in transformers'
fast tokenizers with identical ids, round-trips text, and bad input is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer_train import save_trained, train_tokenizer

SAMPLES = ["The transformer learns attention over tokens.", "naïve café résumé in 東京", "data  text\tand  more"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real prose and code (this package's own sources), plus lines with the samples' rarer characters."""
    import lmforge

    folder = tmp_path_factory.mktemp("corpus")
    package = Path(lmforge.__file__).parent
    # the model's own modules: prose about transformers, attention and tokens (a fixed list, so that files added
    # to the package elsewhere do not change what the tokenizers learn)
    names = ["model/transformer.py", "model/layers.py", "model/cache.py", "model/init.py", "engine.py", "tokenizer.py",
             "generate.py", "sampling.py", "config.py", "weights/names.py", "weights/hf.py", "embeddings.py"]
    for i, source in enumerate(package / n for n in names):
        (folder / f"part{i}.txt").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "extra.md").write_text("\n".join(SAMPLES * 3) + "\n", encoding="utf-8")
    (folder / "notes.bin").write_bytes(b"\xff\xfe ignored: not .txt/.md")
    return folder


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_trained_tokenizer_loads_in_lmforge_and_transformers(kind, corpus, tmp_path):
    size = {"bpe": 1000, "wordpiece": 500, "unigram": 500}[kind]
    tok = train_tokenizer([corpus], kind, vocab_size=size, specials=["<extra>"])
    sentinels = 100 if kind == "unigram" else 0  # T5's <extra_id_N>, added after the learned vocabulary
    assert tok.vocab_size <= size + sentinels and tok.token_id("<extra>") is not None
    if kind == "unigram":
        assert tok.token_id("<extra_id_0>") == tok.vocab_size - 1 and tok.token_id("<extra_id_99>") is not None
    folder = save_trained(tok, tmp_path / "tok")
    ours = Tokenizer.from_dir(folder)
    theirs = AutoTokenizer.from_pretrained(folder)
    assert isinstance(theirs, PreTrainedTokenizerFast)
    single = PreTrainedTokenizerFast(tokenizer_file=str(save_trained(tok, tmp_path / "alone.json")))
    for text in SAMPLES:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids == single(text).input_ids
        assert len(ids) < len(text.encode())  # merges were learned: fewer tokens than bytes
        if text == SAMPLES[0]:
            assert len(ids) < len(text) / 2  # ... and common words are single tokens
        decoded = ours.decode(ids)
        if kind == "bpe":
            assert decoded == text  # byte-level: lossless
        elif kind == "wordpiece":
            assert ids[0] == ours.token_id("[CLS]") and ids[-1] == ours.token_id("[SEP]")
            normalized = ours.backend.normalizer.normalize_str(text)  # lowercased, accents stripped
            if text == SAMPLES[1]:
                assert normalized.split() == ["naive", "cafe", "resume", "in", "東", "京"]
            assert decoded.replace(" ", "") == "".join(normalized.split())
        else:
            assert ids[-1] == ours.token_id("</s>")
            assert decoded == " ".join(text.split())
    assert theirs.unk_token == {"bpe": "<|endoftext|>", "wordpiece": "[UNK]", "unigram": "<unk>"}[kind]


def test_cli_train_and_errors(corpus, tmp_path, capsys):
    out = tmp_path / "bpe.json"
    assert main(["tokenizer", "train", "--files", str(corpus / "part0.txt"), str(corpus / "part1.txt"),
                 "--kind", "bpe", "--vocab-size", "300", "--out", str(out)]) == 0
    assert "300 tokens" in capsys.readouterr().err
    assert PreTrainedTokenizerFast(tokenizer_file=str(out)).decode(
        PreTrainedTokenizerFast(tokenizer_file=str(out))("café 東京").input_ids) == "café 東京"

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\ncaf\xe9\n")
    for argv, message in [
        (["--files", str(bad)], "line 2 is not valid UTF-8"),
        (["--files", str(tmp_path / "missing.txt")], "no such file"),
        (["--files", str(corpus / "part0.txt"), "--vocab-size", "100"], "vocab size"),
    ]:
        assert main(["tokenizer", "train", *argv, "--out", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LmforgeError, match="empty"):
        train_tokenizer([tmp_path / "empty.txt"], "wordpiece", vocab_size=100)
