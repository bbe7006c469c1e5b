"""Prefill and decode speed on the shipped SmolLM2-135M GGUF: lmforge vs transformers (and llama.cpp).

All engines run in this one process on the same weights, so the host's speed of the day cancels out
of the ratios. Prefill: one 512-token prompt. Decode: batch 1, 128 greedy tokens after that prompt,
timed as (prefill + 128 tokens) - prefill, median of 3 runs. llama-cpp-python is measured only when
installed (`pip install -e ".[bench]"`, a ~15 minute native build); its row is skipped otherwise.

    .venv/bin/python benchmarks/decode.py [--runs 3] [--new-tokens 128] [--prompt-tokens 512] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from lmforge.engine import Engine
from lmforge.generate import SamplingParams
from lmforge.weights.load import load
from lmforge.weights.registry import resolve

MODEL = "smollm2-135m-instruct"
TEXT = (
    "The history of natural language processing generally started in the 1950s, although work can be found "
    "from earlier periods. In 1950, Alan Turing published an article titled Computing Machinery and "
    "Intelligence which proposed what is now called the Turing test as a criterion of intelligence. "
)


def median_time(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection are not what we measure
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rates(prefill: Callable[[], object], full: Callable[[], object], n_prompt: int, n_new: int, runs: int):
    t_prefill = median_time(prefill, runs)
    t_full = median_time(full, runs)
    return n_prompt / t_prefill, (n_new - 1) / max(t_full - t_prefill, 1e-9)


def bench_lmforge(prompt: list[int], n_new: int, runs: int, dtype: str, compile: bool = False) -> tuple[float, float]:
    model, _ = load(MODEL, dtype=dtype)
    greedy = SamplingParams(max_new_tokens=n_new, temperature=0)
    first = SamplingParams(max_new_tokens=1, temperature=0)

    def run(params: SamplingParams) -> None:  # the engine as generate() drives it: one request, batch 1
        engine = Engine(model, max_batch=1, eos_ids=[], compile=compile)
        engine.add(prompt, params)
        while engine.has_work():
            engine.step()

    if compile:
        run(greedy)  # compile outside the timing (and a second shape for dynamic sizes)
    return rates(lambda: run(first), lambda: run(greedy), len(prompt), n_new, runs)


def bench_transformers(prompt: list[int], n_new: int, runs: int, dtype: str) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = resolve(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype))
    model.eval()
    ids = torch.tensor([prompt])

    def run(n: int) -> None:
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    return rates(lambda: run(1), lambda: run(n_new), len(prompt), n_new, runs)


def bench_llama_cpp(prompt: list[int], n_new: int, runs: int) -> tuple[float, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(resolve(MODEL)), n_ctx=len(prompt) + n_new + 8, n_threads=torch.get_num_threads(),
                verbose=False)

    def run(n: int) -> None:
        llm.reset()
        llm.eval(prompt)
        for _ in range(n - 1):
            llm.eval([llm.sample(temp=0.0)])

    return rates(lambda: run(1), lambda: run(n_new), len(prompt), n_new, runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--compile", action="store_true", help="also measure the engine with its decode step compiled")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console(width=120)

    _, tokenizer = load(MODEL)
    ids = tokenizer.encode(TEXT * 40)[: args.prompt_tokens]
    rows: list[tuple[str, str, tuple[float, float] | None]] = []
    with console.status("measuring ..."):
        rows.append(("transformers", "float32", bench_transformers(ids, args.new_tokens, args.runs, "float32")))
        rows.append(("lmforge", "float32", bench_lmforge(ids, args.new_tokens, args.runs, "float32")))
        rows.append(("lmforge", "bfloat16", bench_lmforge(ids, args.new_tokens, args.runs, "bfloat16")))
        if args.compile:
            compiled = bench_lmforge(ids, args.new_tokens, args.runs, "float32", compile=True)
            rows.append(("lmforge compiled", "float32", compiled))
        rows.append(("llama.cpp (Q4_1)", "gguf", bench_llama_cpp(ids, args.new_tokens, args.runs)))

    base_prefill, base_decode = rows[0][2]  # type: ignore[misc]
    title = (f"SmolLM2-135M on {torch.get_num_threads()} threads: {len(ids)}-token prompt, "
             f"{args.new_tokens} new tokens, median of {args.runs}")
    table = Table(title=title, caption="ratio = this engine / transformers, same run")
    for col in ("engine", "dtype", "prefill tok/s", "decode tok/s", "prefill ratio", "decode ratio"):
        table.add_column(col, justify="left" if col in ("engine", "dtype") else "right")
    for engine, dtype, result in rows:
        if result is None:
            table.add_row(engine, dtype, "skipped", "(no llama-cpp-python)", "", "")
            continue
        prefill, decode = result
        table.add_row(engine, dtype, f"{prefill:,.0f}", f"{decode:,.1f}", f"{prefill / base_prefill:.2f}x",
                      f"{decode / base_decode:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
