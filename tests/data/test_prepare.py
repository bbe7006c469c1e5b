"""`lmforge data prepare`: cleaning, filters and dedup drop what they should and keep the rest; shards decode back
to the cleaned documents; the split depends on the text alone; a killed run resumes to byte-identical output;
TokenSplit reads across shard boundaries; bad input is one line and exit 2, with nothing overwritten."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lmforge.data.prepare as prep
from lmforge.cli import main
from lmforge.data.clean import Filters, clean_text, dup_line_fraction, exact_key, filter_reason, split_value
from lmforge.data.shards import TokenSplit, read_meta
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer_train import save_trained, train_tokenizer

SYLLABLES = "ka lo mi ne su ta ri po ve da fi gu ho je lu".split()
WORDS = [a + b for a in SYLLABLES for b in SYLLABLES]  # 225 made-up words: random texts share no 5-grams


def words(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(WORDS) for _ in range(n)]


def doc(seed: int, n: int = 80) -> str:
    return " ".join(words(seed, n)) + "."


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A byte-level BPE (lossless decode; <|endoftext|> is bos and eos) trained in well under a second."""
    folder = tmp_path_factory.mktemp("tok")
    (folder / "train.txt").write_text("\n".join(doc(i) for i in range(300)) + "\nCafé naïve 東京 spam eggs\n")
    return save_trained(train_tokenizer([folder / "train.txt"], "bpe", vocab_size=400), folder / "tokenizer")


def decoded_docs(out: Path, split: str) -> list[str]:
    """The split's token stream cut at the separators, each piece decoded with the dataset's own tokenizer."""
    data = TokenSplit(out, split)
    tokens = data.read(0, len(data))
    tokenizer = Tokenizer.from_dir(out)
    assert len(tokens) == 0 or tokens[-1] == data.sep_id  # every document ends with the separator
    cuts = np.flatnonzero(tokens == data.sep_id)
    pieces = np.split(tokens, cuts + 1)[:-1]
    return [tokenizer.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces]


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- cleaning and filters -----------------------------------------------------------------------


def test_clean_text_nfc_controls_newlines_surrogates():
    assert clean_text("  Cafe\u0301\r\nline\ttwo\x00\x07\x1b[0m\x85 end\rlast \n") == "Café\nline\ttwo[0m end\nlast"
    assert clean_text("e\x07\u0301") == "é"  # the control between letter and accent does not block composition
    assert clean_text("a\ud800b") == "a\ufffdb"  # a lone surrogate from a JSON escape
    assert clean_text("\x00\x01 \n\t") == ""


def test_filters_drop_short_and_repetitive_text():
    f = Filters()
    assert filter_reason(doc(1), f) is None
    assert filter_reason("one two three four five six seven", f) is None  # 33 chars, 7 words
    assert filter_reason("Hi there.", f) == "too_short"
    assert filter_reason("abcdefghijklmnopqrstuvwxyz0123", f) == "too_short"  # 30 chars but one word
    assert dup_line_fraction("aa\nbb\n\naa\n") == pytest.approx(2 / 6)
    lines = "\n".join([doc(2, 10), *["Buy now!"] * 6])
    assert filter_reason(lines, f) == "repeated_lines"
    spam = " ".join(["spam eggs ham"] * 12 + words(3, 10))
    assert filter_reason(spam, f) == "repeated_ngrams"
    assert filter_reason(" ".join(["spam eggs ham"] * 4), f) is None  # under 30 words: the n-gram rule waits


# ---- the pipeline ------------------------------------------------------------------------------


def test_prepare_dedups_filters_and_round_trips(tok_dir, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "a").mkdir(parents=True)
    (corpus / "b" / "deep").mkdir(parents=True)
    distinct = [f"Café {i}. " + doc(i) for i in range(24)]
    for i, text in enumerate(distinct[:20]):
        (corpus / "a" / f"{i:02d}.txt").write_text(text)
    long = " ".join(words(100, 300))  # near-dup detection needs enough shingles: long texts
    near = long.split()
    near[150:152] = ["kaka", "lolo"]  # two words changed
    (corpus / "b" / "long.md").write_text(long)
    (corpus / "b" / "long_edited.md").write_text(" ".join(near))
    # the same text as distinct[3] once cleaned: decomposed accent, CRLF-free, a bell character
    (corpus / "b" / "deep" / "copy.txt").write_text(distinct[3].replace("é", "e\u0301").replace("Caf", "\x07Caf"))
    (corpus / "b" / "deep" / "short.txt").write_text("Hi there.")
    (corpus / "b" / "deep" / "lines.txt").write_text("\n".join([doc(2, 10), *["Buy now!"] * 6]))
    (corpus / "b" / "deep" / "spam.txt").write_text(" ".join(["spam eggs ham"] * 12 + words(3, 10)))
    special = "A literal <|endoftext|> inside a document is text, not a separator."
    rows = [{"text": distinct[20]}, {"text": special}, {"text": distinct[21] + "\x00"}]
    (corpus / "b" / "rows.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    (corpus / "b" / "notes.csv").write_text("ignored: not a corpus file type")
    (corpus / ".hidden").mkdir()
    (corpus / ".hidden" / "x.txt").write_text(doc(500))

    out = tmp_path / "out"
    stats = prep.prepare([corpus], tok_dir, out, val_fraction=0.3, shard_tokens=200, workers=1, progress=False)

    assert stats["docs_in"] == 29
    assert stats["dropped"] == {"too_short": 1, "repeated_lines": 1, "repeated_ngrams": 1, "exact_duplicate": 1,
                                "near_duplicate": 1}
    assert stats["docs_out"] == 24
    # corpus order: a/ (sorted), then b/ walked in sorted path order
    kept = [*distinct[:20], long, distinct[20], special, distinct[21]]
    val = [t for t in kept if split_value(exact_key(t)) < 0.3]
    train = [t for t in kept if t not in val]
    assert train and val
    assert decoded_docs(out, "train") == train
    assert decoded_docs(out, "val") == val
    assert stats["splits"]["train"]["docs"] == len(train) and stats["splits"]["val"]["docs"] == len(val)

    meta = read_meta(out)
    tokenizer = Tokenizer.from_dir(tok_dir)
    assert meta["dtype"] == "uint16" and meta["sep_id"] == tokenizer.eos_id and meta["vocab_size"] == 400
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").read_bytes() == (tok_dir / "tokenizer_config.json").read_bytes()
    for split in ("train", "val"):
        sizes = meta["splits"][split]["tokens"]
        assert sizes[:-1] == [200] * (len(sizes) - 1) and 0 < sizes[-1] <= 200
        assert sum(sizes) == stats["splits"][split]["tokens"] == len(TokenSplit(out, split))
        for name, n in zip(meta["splits"][split]["shards"], sizes, strict=True):
            assert (out / name).stat().st_size == 2 * n
    assert json.loads((out / "stats.json").read_text()) == stats
    assert not (out / ".prepare").exists()

    before = files_of(out)
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert prep.prepare([corpus], tok_dir, out, val_fraction=0.3, shard_tokens=200, workers=1, progress=False) == stats
    assert files_of(out) == before and (out / "meta.json").stat().st_mtime_ns == stamp  # done: nothing rewritten

    # the thresholds are options: loosened, the repetitive documents and the near duplicate stay
    loose = prep.prepare([corpus], tok_dir, tmp_path / "loose", val_fraction=0.3, workers=1, progress=False,
                         min_chars=5, min_words=2, max_dup_line_fraction=1.0, max_top_ngram_fraction=1.0,
                         near_dup_threshold=None)
    assert loose["dropped"] == {"too_short": 0, "repeated_lines": 0, "repeated_ngrams": 0, "exact_duplicate": 1,
                                "near_duplicate": 0}
    with pytest.raises(LmforgeError, match="no documents left: all 29 were dropped \\(29 too short\\)"):
        prep.prepare([corpus], tok_dir, tmp_path / "strict", min_words=1000, workers=1, progress=False)
    assert not (tmp_path / "strict").exists()


def test_jsonl_field_and_parquet_row_groups(tok_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [doc(i, 30) for i in range(12)]
    rows = [{"id": i, "text": "not this field", "body": t} for i, t in enumerate(texts[:4])]
    (tmp_path / "a.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    table = pa.table({"body": [*texts[4:], None], "other": list(range(9))})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=3)  # 3 row groups, read batch by batch
    assert pq.ParquetFile(tmp_path / "b.parquet").num_row_groups == 3

    out = tmp_path / "out"
    stats = prep.prepare([tmp_path / "a.jsonl", tmp_path / "b.parquet"], tok_dir / "tokenizer.json", out,
                         field="body", val_fraction=0.0, shard_tokens=64, workers=1, progress=False)
    assert stats["docs_in"] == 13 and stats["dropped"]["too_short"] == 1  # the null row is an empty document
    assert decoded_docs(out, "train") == texts
    assert stats["splits"]["val"] == {"docs": 0, "tokens": 0, "shards": 0} and len(TokenSplit(out, "val")) == 0


def write_word_tokenizer(path: Path, size: int, specials: list[str]) -> None:
    """A whitespace WordLevel tokenizer: w0..w{size-1}, then the special tokens."""
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {f"w{i}": i for i in range(size)}
    vocab["[UNK]"] = size
    backend = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(s, special=True) for s in specials])
    backend.save(str(path))


def test_uint32_shards_for_a_large_vocabulary(tmp_path):
    write_word_tokenizer(tmp_path / "big.json", 70_000, ["</s>"])  # no config: the separator is found by name
    ids = [[69_999, 5, 65_536, 40_000, 123, 66_000, 7, 8], [1, 2, 3, 69_000, 65_535, 65_537, 9, 10]]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": " ".join(f"w{i}" for i in d)}) + "\n"
                                                 for d in ids))
    out = tmp_path / "out"
    prep.prepare([tmp_path / "docs.jsonl"], tmp_path / "big.json", out, val_fraction=0, workers=1, progress=False)
    meta = read_meta(out)
    sep = 70_001
    assert meta["dtype"] == "uint32" and meta["sep_id"] == sep and meta["vocab_size"] == 70_002
    data = TokenSplit(out, "train")
    assert data.read(0, len(data)).tolist() == [*ids[0], sep, *ids[1], sep]
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "big.json").read_bytes()


def test_split_is_stable_across_order_and_workers(tok_dir, tmp_path):
    for name, seeds in (("A", range(0, 25)), ("B", range(25, 50))):
        (tmp_path / name).mkdir()
        for i in seeds:
            (tmp_path / name / f"{i}.txt").write_text(doc(i, 40))
    kwargs = {"val_fraction": 0.25, "shard_tokens": 256, "progress": False}
    one = prep.prepare([tmp_path / "A", tmp_path / "B"], tok_dir, tmp_path / "ab", workers=1, **kwargs)
    two = prep.prepare([tmp_path / "B", tmp_path / "A"], tok_dir, tmp_path / "ba", workers=2, **kwargs)
    assert one["splits"]["val"]["docs"] == two["splits"]["val"]["docs"] > 5
    assert one["splits"]["train"]["docs"] > 25
    for split in ("train", "val"):
        assert sorted(decoded_docs(tmp_path / "ab", split)) == sorted(decoded_docs(tmp_path / "ba", split))


# ---- interrupt and resume ----------------------------------------------------------------------

KILLER = """
import os, signal, sys
import lmforge.data.prepare as prep
from lmforge.cli import main

at, torn, argv = int(sys.argv[1]), sys.argv[2] == "torn", sys.argv[3:]
real, shards = prep._write_atomic, []

def dying(path, data):
    if path.suffix == ".bin":
        shards.append(path)
        if len(shards) == at:  # SIGKILL: no cleanup of any kind runs
            if torn:  # half of the shard's temporary file is on disk
                path.with_name(path.name + ".tmp").write_bytes(data.tobytes()[: data.nbytes // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)

prep._write_atomic = dying
sys.exit(main(argv))
"""


def test_killed_run_resumes_to_identical_output(tok_dir, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"{i:02d}.txt").write_text(doc(i, 50))
    (corpus / "dup.txt").write_text(doc(7, 50))
    options = ["--val-fraction", "0.2", "--shard-tokens", "96"]
    reference = tmp_path / "reference"
    assert main(["data", "prepare", str(corpus), "--tokenizer", str(tok_dir), "--out", str(reference), "--workers",
                 "2", *options]) == 0
    assert len(read_meta(reference)["splits"]["train"]["shards"]) > 20

    out = tmp_path / "out"
    argv = ["data", "prepare", str(corpus), "--tokenizer", str(tok_dir / "tokenizer.json"), "--out", str(out),
            "--workers", "1", *options]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # killed twice: while writing the 5th shard (half of it on disk), then at the 3rd shard of the resumed run
    for at, how, shards, tmps in ((5, "torn", 4, 1), (3, "clean", 6, 0)):
        done = subprocess.run([sys.executable, "-c", KILLER, str(at), how, *argv], env=env, capture_output=True,
                              timeout=120)
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()
        assert not (out / "meta.json").exists() and (out / ".prepare" / "journal.bin").exists()
        on_disk = [p.name for split in ("train", "val") for p in (out / split).iterdir()]
        assert sum(n.endswith(".bin") for n in on_disk) == shards and sum(n.endswith(".tmp") for n in on_disk) == tmps
    with pytest.raises(LmforgeError, match="not a prepared dataset.*interrupted"):
        read_meta(out)

    processed = []
    real_process = prep._process
    monkeypatch.setattr(prep, "_process", lambda texts: processed.extend(texts) or real_process(texts))
    assert main(argv) == 0
    assert 0 < len(processed) < 61  # resumed: the documents in finished shards were not tokenised again
    assert files_of(out) == files_of(reference)  # shards, meta.json, stats.json, tokenizer: byte for byte


# ---- reading shards ----------------------------------------------------------------------------


def write_dataset(folder: Path, sizes: list[int], dtype: str = "uint16") -> np.ndarray:
    stream = np.arange(sum(sizes), dtype=np.int64) * 997 % (2**16 if dtype == "uint16" else 2**20)
    (folder / "train").mkdir(parents=True)
    names, start = [], 0
    for i, n in enumerate(sizes):
        names.append(f"train/{i:05d}.bin")
        stream[start : start + n].astype("<u2" if dtype == "uint16" else "<u4").tofile(folder / names[-1])
        start += n
    meta = {"format": "lmforge-tokens/1", "dtype": dtype, "vocab_size": 2**20, "sep_id": 0,
            "splits": {"train": {"shards": names, "tokens": sizes}, "val": {"shards": [], "tokens": []}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return stream


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_split_reads_across_shard_boundaries(tmp_path, dtype):
    stream = write_dataset(tmp_path, [5, 3, 7], dtype)
    data = TokenSplit(tmp_path, "train")
    assert len(data) == data.n_tokens == 15
    for start, n in [(0, 15), (3, 10), (4, 1), (5, 3), (4, 5), (14, 1), (15, 0), (0, 0)]:
        got = data.read(start, n)
        assert got.dtype == np.int64 and got.tolist() == stream[start : start + n].tolist()
    for start, n in [(10, 10), (-1, 2), (0, -1)]:
        with pytest.raises(IndexError):
            data.read(start, n)
    assert not data._shard(0).flags.writeable
    again = pickle.loads(pickle.dumps(data))  # e.g. into DataLoader workers: shards mapped afresh
    assert again.read(2, 9).tolist() == stream[2:11].tolist()
    assert len(TokenSplit(tmp_path, "val")) == 0


def test_read_meta_and_token_split_refuse_what_is_not_a_dataset(tmp_path):
    with pytest.raises(LmforgeError, match="not a prepared dataset: no meta.json"):
        read_meta(tmp_path)
    write_dataset(tmp_path, [4, 4])
    meta = json.loads((tmp_path / "meta.json").read_text())
    for change, message in [
        ({"format": "other/1"}, "format is 'other/1'"),
        ({"dtype": "int8"}, "dtype is 'int8'"),
        ({"splits": {"train": meta["splits"]["train"]}}, "train and val"),
        ({"splits": {**meta["splits"], "val": {"shards": ["../x.bin"], "tokens": [1]}}}, "bad shard path"),
    ]:
        (tmp_path / "meta.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(LmforgeError, match=message):
            read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="bad .*meta.json"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "train" / "00001.bin").write_bytes(b"\0\0")
    with pytest.raises(LmforgeError, match="00001.bin: shard is 2 bytes, meta.json says 8 bytes"):
        TokenSplit(tmp_path, "train")


# ---- the command line: bad input -------------------------------------------------------------


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["data", "prepare", *argv])
    return code, capsys.readouterr().err


def test_cli_bad_input_is_one_line_and_writes_nothing(tok_dir, tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text(doc(1))
    (tmp_path / "empty").mkdir()
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " + doc(2).encode())
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def " + doc(3).encode())
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": doc(4)}) + "\n" + json.dumps({"body": "x"}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "short.txt").write_text("tiny")
    write_word_tokenizer(tmp_path / "nosep.json", 10, [])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "t.parquet")
    out = tmp_path / "out"
    tok = str(tok_dir)
    cases = [
        ([str(tmp_path / "empty")], tok, "no .txt, .md, .jsonl, .parquet files in"),
        ([str(tmp_path / "missing")], tok, "no such file or folder"),
        ([str(tmp_path / "data.csv")], tok, "data.csv: unknown file type '.csv'"),
        ([str(tmp_path / "latin1.txt")], tok, "latin1.txt is not valid UTF-8 (byte 0xe9 at offset 3)"),
        ([str(tmp_path / "nul.txt")], tok, "nul.txt looks like a binary file (NUL byte at offset 3)"),
        ([str(tmp_path / "rows.jsonl")], tok, "rows.jsonl line 2 has no field 'text'"),
        ([str(tmp_path / "bad.jsonl")], tok, "bad.jsonl line 2: not valid JSON"),
        ([str(tmp_path / "t.parquet")], tok, "t.parquet has no column 'text' (columns: content"),
        ([str(tmp_path / "short.txt")], tok, "no documents left: all 1 were dropped (1 too short)"),
        ([str(good)], str(tmp_path / "nowhere"), "no such tokenizer file"),
        ([str(good)], str(tmp_path / "empty"), "no tokenizer.json in"),
        ([str(good)], str(tmp_path / "nosep.json"), "has no document separator"),
    ]
    for sources, tokenizer, message in cases:
        code, err = run(capsys, *sources, "--tokenizer", tokenizer, "--out", str(out), "--workers", "1")
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (message, err)
        assert message in err, (message, err)
        assert not out.exists(), message


def test_mid_run_error_leaves_no_partial_output(tok_dir, tmp_path, capsys, monkeypatch):
    for i in range(6):
        (tmp_path / f"{i}.txt").write_text(doc(i))
    (tmp_path / "9.txt").write_bytes(b"\xff" + doc(9).encode())  # read last, after shards were written
    written = []
    real = prep._write_atomic
    monkeypatch.setattr(prep, "_write_atomic", lambda path, data: written.append(path.name) or real(path, data))
    monkeypatch.setattr(prep, "BATCH_DOCS", 2)
    out = tmp_path / "out"
    code, err = run(capsys, str(tmp_path), "--tokenizer", str(tok_dir), "--out", str(out), "--shard-tokens", "32",
                    "--workers", "1")
    assert code == 2 and "9.txt is not valid UTF-8" in err
    assert "00000.bin" in written and not out.exists()


def test_cli_refuses_an_out_made_otherwise_unless_overwrite(tok_dir, tmp_path, capsys):
    (tmp_path / "c").mkdir()
    for i in range(5):
        (tmp_path / "c" / f"{i}.txt").write_text(doc(i))
    out = tmp_path / "out"
    base = [str(tmp_path / "c"), "--tokenizer", str(tok_dir), "--out", str(out), "--workers", "1"]
    assert main(["data", "prepare", *base]) == 0
    assert "documents kept" in capsys.readouterr().out
    before = files_of(out)
    code, err = run(capsys, *base, "--min-chars", "50", "--shard-tokens", "100")
    assert code == 2 and "holds a dataset made with different options (min_chars, shard_tokens)" in err
    assert "--overwrite" in err and err.count("\n") == 1 and files_of(out) == before
    other = save_trained(train_tokenizer([tmp_path / "c"], "bpe", vocab_size=300), tmp_path / "other.json")
    code, err = run(capsys, str(tmp_path / "c"), "--tokenizer", str(other), "--out", str(out), "--workers", "1")
    assert code == 2 and "different tokenizer" in err and files_of(out) == before
    (tmp_path / "c" / "5.txt").write_text(doc(5))
    code, err = run(capsys, *base)
    assert code == 2 and "different sources" in err and files_of(out) == before
    assert main(["data", "prepare", *base, "--min-chars", "50", "--overwrite"]) == 0
    assert read_meta(out)["options"]["min_chars"] == 50 and read_meta(out)["sources"][-1].endswith("5.txt")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    code, err = run(capsys, str(tmp_path / "c"), "--tokenizer", str(tok_dir), "--out", str(foreign), "--overwrite")
    assert code == 2 and "not empty and holds no lmforge dataset" in err
    assert (foreign / "keep.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tok_dir, tmp_path):
    import fcntl

    (tmp_path / "a.txt").write_text(doc(1))
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running prepare holds it
        with pytest.raises(LmforgeError, match="another `lmforge data prepare` is writing"):
            prep.prepare([tmp_path / "a.txt"], tok_dir, out, workers=1, progress=False)
        assert list(out.iterdir()) == []
    finally:
        os.close(fd)
    assert prep.prepare([tmp_path / "a.txt"], tok_dir, out, workers=1, progress=False)["docs_out"] == 1


def test_cli_help_quotes_the_library_defaults(capsys):
    import inspect

    from lmforge.cli import build_parser

    args = build_parser().parse_args(["data", "prepare", "x", "--tokenizer", "t", "--out", "o"])
    assert not any(hasattr(args, name) for name in ("field", "min_chars", "overwrite"))  # prepare's defaults apply
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, param in inspect.signature(prep.prepare).parameters.items():
        if param.kind is param.KEYWORD_ONLY and param.default not in (None, False, True):
            assert f"(default: {param.default}" in text, name


def test_shard_reader_imports_nothing_heavy():
    code = "import json, sys\nimport lmforge.data.shards\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    heavy = {"torch", "tokenizers", "datasketch", "pyarrow", "scipy", "lmforge.tokenizer", "lmforge.data.prepare"}
    assert heavy.isdisjoint(json.loads(out.stdout))
