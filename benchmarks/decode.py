"""Prefill and decode speed on the shipped SmolLM2-135M GGUF: lmforge vs transformers (and llama.cpp).

lmforge and transformers run in this one process on the same weights, so the host's speed of the day
cancels out of their ratios. Prefill: one 512-token prompt. Decode: batch 1, 128 greedy tokens after that prompt,
median of 3 runs. lmforge times its engine's first step (the prompt and the first token) and the decode steps after
it apart, as llama-bench times pp and tg; transformers' generate() is timed as (prefill + 128 tokens) - prefill.
The llama.cpp row is llama.cpp's own `llama-bench` on the same GGUF file and thread count (its pp512, and tg128
decoded after the prompt's 512 tokens: mean of --runs after a warm-up); skipped until built:
`.venv/bin/python benchmarks/llamacpp.py --build`.

Each lmforge precision (--dtypes) gets a row, with its load time (in this process, file cached) and the peak
RSS of `lmforge generate --dtype D` on a short prompt (a fresh process each).

    .venv/bin/python benchmarks/decode.py [--runs 3] [--new-tokens 128] [--prompt-tokens 512] [--compile]
                                          [--dtypes float32,bfloat16,int8,int4] [--batch 8]

`--batch B` instead measures batched decode: B requests decoding together through the one engine (each weight
read once per step for all rows), aggregate tokens/s against batch 1, per dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import llamacpp  # benchmarks/llamacpp.py, importable as this script's own folder is on sys.path
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


def peak_rss_mb(dtype: str) -> float:
    """Peak resident memory of a whole `lmforge generate --dtype D` run (16 tokens), in its own process."""
    import subprocess
    import sys

    # VmHWM, not getrusage's ru_maxrss: Linux carries the forking parent's peak (this big process) across exec
    script = ("import re, sys; from lmforge.cli import main; rc = main(sys.argv[1:]); "
              "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
              "print(hwm, file=sys.stderr); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", script, "generate", "--dtype", dtype, "--max-new-tokens", "16",
                          "-t", "0", "Hello"], capture_output=True, text=True, check=True)
    return int(out.stderr.strip().splitlines()[-1]) / 1024


LOAD_SECONDS: dict[str, float] = {}


def bench_lmforge(prompt: list[int], n_new: int, runs: int, dtype: str, compile: bool = False) -> tuple[float, float]:
    load(MODEL, dtype=dtype)  # first load: file pages cached, kernels loaded
    start = time.perf_counter()
    model, _ = load(MODEL, dtype=dtype)
    LOAD_SECONDS[dtype] = time.perf_counter() - start
    greedy = SamplingParams(max_new_tokens=n_new, temperature=0)

    def run() -> tuple[float, float]:  # the engine as generate() drives it: one request, batch 1
        engine = Engine(model, max_batch=1, eos_ids=[], compile=compile)
        engine.add(prompt, greedy)
        start = time.perf_counter()
        engine.step()  # the whole prompt (one chunk) and the first token
        prefilled = time.perf_counter()
        while engine.has_work():
            engine.step()
        return prefilled - start, time.perf_counter() - prefilled

    run()  # warm-up (and, with --compile, the compilation)
    times = [run() for _ in range(runs)]
    # timed separately, as llama-bench's pp and tg are: a prefill's noise never lands in the decode rate
    return (len(prompt) / statistics.median(t for t, _ in times),
            (n_new - 1) / statistics.median(t for _, t in times))


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


def bench_llamacpp(n_prompt: int, n_new: int, runs: int) -> tuple[tuple[float, float] | None, str]:
    """llama.cpp's own speed on the same GGUF, via llama-bench; (None, why) when it is not built.

    llama-bench runs in its own process with its own timing, so this row is not paired with the others the
    way in-process runs are; decode is measured at depth n_prompt so it matches "decode after the prompt".
    """
    try:
        r = llamacpp.llama_bench(resolve(MODEL), n_prompt=n_prompt, n_gen=n_new, threads=torch.get_num_threads(),
                                 reps=runs, depth=n_prompt)
    except llamacpp.MissingBinary as e:
        return None, f"llama.cpp row skipped: {e}"
    note = (f"llama.cpp {r['build']}: llama-bench pp{n_prompt} and tg{n_new} at depth "
            f"{r['depth']}, mean of {runs} (std {r['prefill_std']:,.0f} / {r['decode_std']:,.1f} tok/s)")
    return (r["prefill_tok_s"], r["decode_tok_s"]), note


def batched_rate(dtype: str, rows: int, steps: int = 40) -> float:
    """Aggregate tokens/s of `rows` greedy requests decoding together, after their prefill."""
    model, tokenizer = load(MODEL, dtype=dtype)
    engine = Engine(model, tokenizer, max_batch=rows, eos_ids=[])
    for i in range(rows):
        engine.add(tokenizer.encode(f"Story number {i}: once upon a time"), SamplingParams(max_new_tokens=steps + 8,
                                                                                           temperature=0))
    for _ in range(3):  # prefills and first tokens
        engine.step()
    start, n = time.perf_counter(), 0
    for _ in range(steps):
        n += sum(out.token is not None for out in engine.step())
    return n / (time.perf_counter() - start)


def main_batched(dtypes: list[str], rows: int, console: Console) -> None:
    table = Table(title=f"SmolLM2-135M batched decode, {torch.get_num_threads()} threads, 40 steps")
    for col in ("dtype", "batch 1 tok/s", f"batch {rows} tok/s (aggregate)", "gain"):
        table.add_column(col, justify="left" if col == "dtype" else "right")
    for dtype in dtypes:
        one, many = batched_rate(dtype, 1), batched_rate(dtype, rows)
        table.add_row(dtype, f"{one:,.1f}", f"{many:,.1f}", f"{many / one:.2f}x")
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--compile", action="store_true", help="also measure the engine with its decode step compiled")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8,int4", help="lmforge precisions to measure")
    ap.add_argument("--batch", type=int, default=0, help="measure batched decode at this many rows instead")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console(width=120)
    if args.batch:
        main_batched(args.dtypes.split(","), args.batch, console)
        return

    _, tokenizer = load(MODEL)
    ids = tokenizer.encode(TEXT * 40)[: args.prompt_tokens]
    rows: list[tuple[str, str, tuple[float, float] | None]] = []
    with console.status("measuring ..."):
        rows.append(("transformers", "float32", bench_transformers(ids, args.new_tokens, args.runs, "float32")))
        for dtype in args.dtypes.split(","):
            rows.append(("lmforge", dtype, bench_lmforge(ids, args.new_tokens, args.runs, dtype)))
        if args.compile:
            compiled = bench_lmforge(ids, args.new_tokens, args.runs, "float32", compile=True)
            rows.append(("lmforge compiled", "float32", compiled))
        llama_result, llama_note = bench_llamacpp(len(ids), args.new_tokens, args.runs)
        rows.append(("llama.cpp llama-bench", "Q4_1 gguf", llama_result))

        rss = {dtype: peak_rss_mb(dtype) for dtype in args.dtypes.split(",")}

    base_prefill, base_decode = rows[0][2]  # type: ignore[misc]
    llama = llama_result or (float("nan"), float("nan"))
    title = (f"SmolLM2-135M on {torch.get_num_threads()} threads: {len(ids)}-token prompt, "
             f"{args.new_tokens} new tokens, median of {args.runs}")
    table = Table(title=title, caption="ratios: this engine / transformers (tf) and / llama-bench (llama), same run")
    for col in ("engine", "dtype", "prefill tok/s", "decode tok/s", "prefill / tf", "decode / tf", "prefill / llama",
                "decode / llama", "load s", "peak RSS MB"):
        table.add_column(col, justify="left" if col in ("engine", "dtype") else "right")
    for engine, dtype, result in rows:
        if result is None:
            table.add_row(engine, dtype, "skipped", "(see below)", "", "")
            continue
        prefill, decode = result
        ours = engine == "lmforge"
        table.add_row(engine, dtype, f"{prefill:,.0f}", f"{decode:,.1f}", f"{prefill / base_prefill:.2f}x",
                      f"{decode / base_decode:.2f}x", f"{prefill / llama[0]:.2f}x", f"{decode / llama[1]:.2f}x",
                      f"{LOAD_SECONDS[dtype]:.2f}" if ours else "", f"{rss[dtype]:,.0f}" if ours else "")
    console.print(table)
    console.print(llama_note)


if __name__ == "__main__":
    main()
