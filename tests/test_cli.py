"""The CLI through a real subprocess: what a user types, what they see, and the exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.generate import SamplingParams, encode_prompt, generate

pytestmark = pytest.mark.slow


def lmforge(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "lmforge"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lmforge"]
    return subprocess.run(
        [*cmd, *args], input=stdin if stdin is not None else "", capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_generate_greedy_prints_only_the_completion(smollm) -> None:
    model, tokenizer = smollm
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    expected = generate(model, tokenizer, ["The capital of France is"], greedy)
    out = lmforge("generate", "The capital of France is", "--temperature", "0", "--max-new-tokens", "12",
                  "--repetition-penalty", "1", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected[0] + "\n"
    assert "Paris" in out.stdout


def test_generate_chat_with_stop_string(smollm) -> None:
    model, tokenizer = smollm
    ids = encode_prompt(tokenizer, "List three colours, one per line.", chat=True)
    full = generate(model, tokenizer, [ids], SamplingParams(max_new_tokens=40, temperature=0))[0]
    assert "\n" in full.strip()
    out = lmforge("generate", "List three colours, one per line.", "--chat", "--temperature", "0",
                  "--max-new-tokens", "40", "--stop", "\n", "--repetition-penalty", "1", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    assert out.stdout == full[: full.index("\n")] + "\n"


def test_piped_chat_two_turns_and_commands() -> None:
    turns = "What is the capital of France?\n/reset\nWhat is the capital of Germany?\nAnd of Italy?\n/exit\nignored\n"
    out = lmforge("chat", "--temperature", "0", "--max-new-tokens", "24", "--dtype", "float32", stdin=turns)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "Berlin" in out.stdout and "Rome" in out.stdout
    assert "conversation cleared" in out.stderr
    assert ">>>" not in out.stdout  # no prompt decoration when piped


def test_inspect_reports_family_size_and_memory() -> None:
    out = lmforge("inspect", "smollm2-135m-instruct")
    assert out.returncode == 0, out.stderr
    # the weights as load holds them at fp32 / bf16 / int4, 4 MiB of fp32 rotary tables included (memory.py; equal
    # to the loaded model's bytes in tests/model/test_quantize.py)
    for expected in ("decoder (llama)", "134,515,008", "8192", "517 MiB", "261 MiB", "152 MiB", "Q4_1"):
        assert expected in out.stdout


def test_convert_gguf_to_hf_folder(tmp_path: Path, smollm) -> None:
    import torch

    from lmforge.weights.load import load

    dst = tmp_path / "smollm2-hf"
    out = lmforge("convert", "smollm2-135m-instruct", str(dst))
    assert out.returncode == 0, out.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in dst.iterdir()
    }
    assert json.loads((dst / "config.json").read_text())["model_type"] == "llama"
    converted, tokenizer = load(dst, torch.float32)
    model, _ = smollm
    ids = torch.tensor([tokenizer.encode("Hello there, how are you?")])
    assert torch.equal(converted(ids), model(ids))
    again = lmforge("convert", "smollm2-135m-instruct", str(dst))  # never overwrite silently
    assert_one_line_error(again, "not empty")


def test_error_paths_are_one_line_with_exit_code_2(tmp_path: Path, smollm_path: Path) -> None:
    assert_one_line_error(lmforge("generate", "hi", "--model", "no-such-model"), "unknown model", "smollm2")
    assert_one_line_error(lmforge("generate", "hi", "--model", str(tmp_path / "missing.gguf")), "unknown model")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm_path.read_bytes()[:2_000_000])
    assert_one_line_error(lmforge("generate", "hi", "--model", str(truncated)), "bad GGUF")
    assert_one_line_error(lmforge("inspect", str(truncated)), "bad GGUF")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    assert_one_line_error(lmforge("generate", "hi", "--model", str(not_gguf)), "bad GGUF")
    folder = tmp_path / "broken-hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "vocab_size": 100,
    }))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    assert_one_line_error(lmforge("generate", "hi", "--model", str(folder)), "corrupt weights")
    (folder / "config.json").write_text("{not json")
    assert_one_line_error(lmforge("inspect", str(folder)), "config.json")
    for flags, word in ((["--top-p", "0"], "top_p"), (["--temperature", "-1"], "temperature"),
                        (["--max-new-tokens", "0"], "max-new-tokens"), (["--top-k", "x"], "top-k"),
                        (["--dtype", "int3"], "dtype")):
        assert_one_line_error(lmforge("generate", "hi", *flags), word)
    overflow = lmforge("generate", "hello " * 9000, "--max-new-tokens", "4")
    assert_one_line_error(overflow, "context overflow")
    assert lmforge("nonsense-command").returncode == 2


def test_t5_generate_and_inspect_each_family(tmp_path: Path) -> None:
    """`generate` is text-to-text for a T5 folder; `inspect` names every family."""
    import torch
    from model.test_t5 import make_hf, write_word_tokenizer

    from lmforge.weights.load import load

    folder = tmp_path / "t5"
    make_hf("v1.1").save_pretrained(folder)
    write_word_tokenizer(folder)
    model, tokenizer = load(folder, torch.float32)
    expected = generate(model, tokenizer, ["w5 w6 w7 w8"], SamplingParams(max_new_tokens=6, temperature=0))[0]
    out = lmforge("generate", "w5 w6 w7 w8", "--model", str(folder), "--temperature", "0", "--max-new-tokens", "6",
                  "--repetition-penalty", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n" and expected.strip()
    assert "encoder-decoder (t5)" in lmforge("inspect", str(folder)).stdout
    minilm = lmforge("inspect", "minilm-l6").stdout
    assert "encoder (bert)" in minilm and "22,565,376" in minilm  # BERT minus the pooler it never uses


def test_embed_and_text_commands(tmp_path: Path) -> None:
    import numpy as np

    from lmforge import embed

    out = lmforge("embed", "A cat sits on the mat.", "Stocks fell sharply.", "--format", "json")
    assert out.returncode == 0, out.stderr
    vectors = np.array(json.loads(out.stdout), dtype=np.float32)
    np.testing.assert_allclose(vectors, embed(["A cat sits on the mat.", "Stocks fell sharply."]), atol=1e-5)
    words = lmforge("text", "tokenize", "Working with natural language processing techniques is tricky.",
                    "--format", "json")
    assert json.loads(words.stdout) == ["Working", "with", "natural", "language", "processing", "techniques", "is",
                                        "tricky", "."]
    lemmas = lmforge("text", "lemmatize", "--format", "json", stdin="talking talked talk")
    assert json.loads(lemmas.stdout) == ["talk", "talk", "talk"]
    assert_one_line_error(lmforge("embed", "--file", str(tmp_path / "missing.txt")), "missing.txt")
    assert_one_line_error(lmforge("embed", "hi", "--model", "smollm2-135m-instruct"), "decoder-only")
    assert_one_line_error(lmforge("text", "stopwords", "hello", "--lang", "xx"), "xx")
