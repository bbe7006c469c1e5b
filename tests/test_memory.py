"""Memory planning: `lmforge inspect --memory` against what a real `lmforge generate` process holds at its peak."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.memory import RUNTIME_BYTES, plan

# VmHWM, not getrusage's ru_maxrss: Linux carries a forked parent's peak across exec into ru_maxrss
PEAK = ("import re, sys; from lmforge.cli import main; rc = main(sys.argv[1:]); "
        "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
        "print(int(hwm) * 1024, file=sys.stderr); sys.exit(rc)")


def peak_rss(*args: str) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, check=True)
    return int(out.stderr.strip().splitlines()[-1])


# the plan as `lmforge inspect --memory` makes it: in a fresh process, whose own size is the plan's runtime part
PLAN = ("import sys; from lmforge.memory import plan; from lmforge.model_info import read_config; "
        "from lmforge.weights.registry import resolve; "
        "print(plan(read_config(resolve(sys.argv[1]))[0], sys.argv[2], context=64, batch=1).total)")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_plan_is_within_15_percent_of_the_measured_peak(dtype):
    measured = peak_rss("generate", "--dtype", dtype, "--max-new-tokens", "16", "-t", "0", "Hello")
    out = subprocess.run([sys.executable, "-c", PLAN, "smollm2-135m-instruct", dtype], capture_output=True,
                         text=True, check=True)
    planned = int(out.stdout)
    assert abs(planned - measured) <= 0.15 * measured, (planned >> 20, measured >> 20)


def test_a_7b_model_at_int4_with_4k_context_fits_in_8_gib():
    p = plan(ModelConfig.from_name("llama2-7b"), "int4", context=4096)
    assert 3.5 * 2**30 < p.weights < 4.5 * 2**30  # 6.7B weights at ~4.6 bits + an int8 head + bf16 embeddings
    assert p.kv_cache == 2 * 32 * 4096 * 4096 * 2  # k and v, 32 layers, 4k positions, 4096 wide, bf16
    model_part = p.weights + p.kv_cache + p.activations  # the runtime part is this (test) process's own size
    assert model_part + RUNTIME_BYTES < 8 * 2**30
    bf16 = plan(ModelConfig.from_name("llama2-7b"), "bfloat16", context=4096)
    assert bf16.weights + bf16.kv_cache > 8 * 2**30
    args = ["inspect", "--memory", "--config", "llama2-7b", "--dtype", "int4", "--context", "4096"]
    out = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, check=True).stdout
    assert "fits in 8 GiB" in out and "NOT" not in out


def test_bad_memory_requests_are_one_line_errors(capsys):
    assert main(["inspect", "--memory", "--config", "llama2-7b", "--context", "99999"]) == 2
    assert "exceeds the model's 4096 tokens" in capsys.readouterr().err
    assert main(["inspect", "--memory"]) == 2
    assert main(["inspect", "--memory", "--config", "no-such-preset"]) == 2
    assert "unknown config preset" in capsys.readouterr().err
