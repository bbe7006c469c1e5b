"""Fuzzing the loaders with corrupt checkpoints: a tiny GGUF, a tiny HF folder's model.safetensors and its
config.json, each mutated thousands of ways from a fixed seed (bit flips, overwritten counts and lengths,
truncations, inserted and deleted bytes, JSON values changed). Every case must end in a valid load or an
LmforgeError from the calls `generate`, `inspect` and `embed` make (`load`, `inspect_model`): never another
exception, a hang or a crash. Then some of the failing cases go through the real CLI, which must answer with
exit code 2 and exactly one `error:` line."""

from __future__ import annotations

import copy
import json
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tiny
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model_info import inspect_model
from lmforge.weights.load import load

SEED = 20261126
CASE_SECONDS = 10  # far above the ~50 ms a case takes: only a hang gets near it
N_GGUF, N_SAFETENSORS, N_CONFIG = 600, 500, 400


# corrupt quantized blocks dequantize to inf/nan: a valid load as far as the file format goes
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


class CaseTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- mutations ---------------------------------------------------------------------------------------------

INTERESTING_U64 = [0, 1, 2, 3, 7, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63, 2**64 - 1]


def mutate_bytes(data: bytes, rng: random.Random, hot: int) -> tuple[bytes, str]:
    """One random corruption; positions favour the first `hot` bytes (the header: counts, lengths, shapes)."""
    buf = bytearray(data)

    def pos() -> int:
        return rng.randrange(min(hot, len(buf))) if rng.random() < 0.75 else rng.randrange(len(buf))

    kind = rng.choice(["flip", "flip", "byte", "u64", "u32", "truncate", "insert", "delete", "zero_run"])
    if kind == "flip":
        where = [pos() for _ in range(rng.randint(1, 4))]
        for p in where:
            buf[p] ^= 1 << rng.randrange(8)
        return bytes(buf), f"flip bits at {where}"
    if kind == "byte":
        p = pos()
        buf[p] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        return bytes(buf), f"byte {buf[p]:#x} at {p}"
    if kind in ("u64", "u32"):
        size = 8 if kind == "u64" else 4
        p = min(pos() // 4 * 4, len(buf) - size)
        value = rng.choice(INTERESTING_U64) % 2 ** (8 * size)
        buf[p : p + size] = struct.pack("<Q" if size == 8 else "<I", value)
        return bytes(buf), f"{kind} {value} at {p}"
    if kind == "truncate":
        n = rng.choice([0, 1, 7, 8, 9, rng.randrange(len(buf)), pos(), len(buf) - 1])
        return bytes(buf[:n]), f"truncate to {n}"
    if kind == "insert":
        p, junk = pos(), bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        return bytes(buf[:p] + junk + buf[p:]), f"insert {len(junk)} bytes at {p}"
    if kind == "delete":
        p = pos()
        n = rng.randint(1, 64)
        return bytes(buf[:p] + buf[p + n :]), f"delete {n} bytes at {p}"
    p, n = pos(), rng.randint(1, 32)
    buf[p : p + n] = bytes(len(buf[p : p + n]))
    return bytes(buf), f"zero {n} bytes at {p}"


JSON_VALUES = [None, True, False, 0, -1, 1, 2, 3, 31, 1.5, -0.0, 1e308, 10**30, 2**63, "", "x", "llama", "bert",
               "gpt2", "t5", [], [1, 2], {}, {"rope_type": "linear"}, {"rope_type": "default", "rope_theta": -1}]


def mutate_config(text: str, rng: random.Random) -> tuple[str, str]:
    """A changed value, a deleted or added key, a scaled number, or corrupt JSON text."""
    config = json.loads(text)
    kind = rng.choice(["set", "set", "scale", "delete", "add", "text"])
    key = rng.choice(sorted(config))
    if kind == "set":
        config[key] = copy.deepcopy(rng.choice(JSON_VALUES))
        what = f"{key} = {config[key]!r}"
    elif kind == "scale" and isinstance(config[key], int | float) and not isinstance(config[key], bool):
        config[key] = config[key] * rng.choice([0, -1, 2, 3, 1000, 10**9]) + rng.choice([0, 1, -1])
        what = f"{key} = {config[key]!r}"
    elif kind == "delete":
        del config[key]
        what = f"del {key}"
    elif kind == "add":
        key = rng.choice(["rope_scaling", "head_dim", "sliding_window", "use_sliding_window", "num_key_value_heads",
                          "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "layer_types"])
        config[key] = copy.deepcopy(rng.choice(JSON_VALUES))
        what = f"add {key} = {config[key]!r}"
    else:
        data, what = mutate_bytes(text.encode(), rng, len(text))
        return data.decode("utf-8", "surrogateescape"), what
    return json.dumps(config), what


# ---- fixtures and the check of one case ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-fixtures")
    return {"gguf": tiny.gguf_file(root / "tiny.gguf"), "hf": tiny.llama_folder(root / "hf")}


def outcome(path: Path) -> tuple[str, str]:
    """('ok' or 'error: ...') for load and for inspect of one checkpoint; anything else fails the test."""
    results = []
    for call in (lambda: load(path, torch.float32), lambda: inspect_model(str(path))):
        try:
            with time_limit(CASE_SECONDS):
                call()
            results.append("ok")
        except LmforgeError as e:
            message = str(e)
            assert message and "\n" not in message, f"an error message must be one line: {message!r}"
            results.append(f"error: {message}")
    return results[0], results[1]


def run_cases(
    label: str, n: int, make_case: Callable[[random.Random], tuple[Path, str]], seed: int
) -> dict[str, list[Path]]:
    """n cases from make_case. A few are kept for the CLI tests: loads, load errors and inspect errors."""
    rng = random.Random(seed)
    kept: dict[str, list[Path]] = {"ok": [], "load error": [], "inspect error": []}
    for i in range(n):
        path, what = make_case(rng)
        try:
            loaded, inspected = outcome(path)
        except Exception as e:  # the report names the case, so that it can be reproduced
            raise AssertionError(f"{label} case {i} ({what}): {type(e).__name__}: {e}") from e
        buckets = [b for b, hit in (("ok", loaded == inspected == "ok"), ("load error", loaded != "ok"),
                                    ("inspect error", inspected != "ok")) if hit]
        for bucket in buckets:
            if len(kept[bucket]) < 20:
                keep = path.with_name(f"{label}-{i}{path.suffix}")
                if not keep.exists():
                    (shutil.copytree if path.is_dir() else shutil.copy)(path, keep)
                kept[bucket].append(keep)
    return kept


@pytest.fixture(scope="module")
def fuzzed(fixtures: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[Path]]]:
    """Runs every library case once (~50 s); the tests below check the counts and drive the CLI."""
    work = tmp_path_factory.mktemp("fuzz")
    gguf = fixtures["gguf"].read_bytes()
    gguf_hot = _gguf_data_offset(fixtures["gguf"])
    st = (fixtures["hf"] / "model.safetensors").read_bytes()
    st_hot = 8 + int.from_bytes(st[:8], "little")
    config = (fixtures["hf"] / "config.json").read_text()

    def gguf_case(rng: random.Random) -> tuple[Path, str]:
        data, what = mutate_bytes(gguf, rng, gguf_hot)
        path = work / "case.gguf"
        path.write_bytes(data)
        return path, what

    folder = work / "hf"
    shutil.copytree(fixtures["hf"], folder)

    def safetensors_case(rng: random.Random) -> tuple[Path, str]:
        data, what = mutate_bytes(st, rng, st_hot)
        (folder / "model.safetensors").write_bytes(data)
        (folder / "config.json").write_text(config)
        return folder, what

    def config_case(rng: random.Random) -> tuple[Path, str]:
        text, what = mutate_config(config, rng)
        (folder / "model.safetensors").write_bytes(st)
        (folder / "config.json").write_text(text, errors="surrogateescape")
        return folder, what

    start = time.monotonic()
    results = {
        "gguf": run_cases("gguf", N_GGUF, gguf_case, SEED),
        "safetensors": run_cases("safetensors", N_SAFETENSORS, safetensors_case, SEED + 1),
        "config": run_cases("config", N_CONFIG, config_case, SEED + 2),
    }
    print(f"{N_GGUF + N_SAFETENSORS + N_CONFIG} fuzz cases in {time.monotonic() - start:.1f} s")
    return results


def _gguf_data_offset(path: Path) -> int:
    from gguf import GGUFReader

    return int(GGUFReader(path).data_offset)


# ---- tests ---------------------------------------------------------------------------------------------------


def test_fixtures_load(fixtures: dict[str, Path]) -> None:
    """The unmutated fixtures are valid: the fuzz starts from checkpoints that load and inspect."""
    for path in fixtures.values():
        assert outcome(path) == ("ok", "ok")
        model, tokenizer = load(path, torch.float32)
        assert tokenizer.decode(tokenizer.encode("hi there"), skip_special_tokens=True) == "hi there"
        assert torch.isfinite(model(torch.tensor([tokenizer.encode("hi")]))).all()


def test_library_gives_a_model_or_one_clear_error(fuzzed: dict[str, dict[str, list[Path]]]) -> None:
    # the mutations must exercise both outcomes for every kind of file, or the fuzz proves little
    for kind, kept in fuzzed.items():
        assert kept["ok"] and kept["load error"] and kept["inspect error"], kind


def test_cli_inspect_exit_code_2_and_one_error_line(
    fuzzed: dict[str, dict[str, list[Path]]], capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [path for kept in fuzzed.values() for path in kept["inspect error"][:12]]
    assert len(cases) >= 30
    for path in cases:
        rc = main(["inspect", str(path)])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (path, rc, err)
        assert "internal error" not in err and "Traceback" not in err


def test_cli_generate_refuses_corrupt_checkpoints(
    fuzzed: dict[str, dict[str, list[Path]]], capsys: pytest.CaptureFixture[str]
) -> None:
    for kept in fuzzed.values():
        for path in kept["load error"][:3]:
            rc = main(["generate", "hi", "--model", str(path), "--max-new-tokens", "2"])
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.strip()]
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (path, rc, err)


def test_cli_subprocess(fuzzed: dict[str, dict[str, list[Path]]]) -> None:
    cases = [fuzzed[kind]["inspect error"][0] for kind in ("gguf", "safetensors", "config")]
    for path in cases:
        out = subprocess.run([sys.executable, "-m", "lmforge", "inspect", str(path)], capture_output=True, text=True,
                             timeout=120)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (path, out.stderr)
        assert out.stdout == ""
