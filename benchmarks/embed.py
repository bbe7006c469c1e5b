"""Sentence-embedding throughput on the shipped all-MiniLM-L6-v2: lmforge `embed` vs sentence-transformers
`encode`, on the same weights in the same process, same batch size, fp32, CPU.

The sentences are generated (seeded): ~20 words each from a mixed vocabulary. Both engines are warmed up,
then timed in pairs of back-to-back passes over all sentences (alternating which goes first), so a busy
host slows both alike. The table shows each engine's best and median pass and the median of the per-pair
speed ratios, the figure least moved by other load on the machine.

OpenVINO, the backend sentence-transformers offers for CPUs (`backend="openvino"`, through optimum-intel), gets a
row too when the `openvino` package is importable (`pip install -e ".[bench]"`; a benchmark-only peer, skipped
with a note otherwise): the same checkpoint converted in memory with `openvino.convert_model`, compiled for the
CPU with the same thread count and OpenVINO's own precision choice (bf16 where the CPU has it, else fp32), the
same tokenizer and the same mean pooling + L2 normalisation as sentence-transformers, timed in the same pairs.

    .venv/bin/python benchmarks/embed.py [--n 2000] [--batch-size 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from lmforge.embeddings import embed, load_encoder
from lmforge.weights.registry import resolve

MODEL = "minilm-l6"
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their model language token vector search retrieval embedding sentence "
    "network learning data training river mountain city music history science market energy health garden "
    "quickly slowly carefully bright dark ancient modern small large red green blue running building writing"
).split()


def sentences(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = max(3, round(rng.gauss(words, 5)))
        text = " ".join(rng.choice(WORDS) for _ in range(k))
        out.append(text[0].upper() + text[1:] + rng.choice([".", "!", "?", "."]))
    return out


def timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def openvino_encoder(path: str, texts: list[str], batch_size: int) -> tuple[Callable[[], np.ndarray], str] | None:
    """(encode all texts, OpenVINO's inference precision) for the checkpoint at `path`, or None without openvino."""
    try:
        import openvino as ov
    except ImportError:
        return None
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModel.from_pretrained(path).eval()
    example = dict(tok(texts[:2], padding=True, return_tensors="pt"))
    with torch.no_grad():
        converted = ov.convert_model(hf, example_input=example)
    core = ov.Core()
    compiled = core.compile_model(converted, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32, bf16, ...
    names = [i.get_any_name() for i in compiled.inputs]

    def encode() -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="np")
            hidden = compiled({n: enc[n] for n in names})[0]  # (B, T, d)
            mask = enc["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        return np.concatenate(out)

    return encode, precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="sentences to encode per pass")
    parser.add_argument("--words", type=int, default=20, help="mean words per sentence")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5, help="timed passes per engine")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging

    logging.disable_progress_bar()
    texts = sentences(args.n, args.words)
    path = resolve(MODEL)
    st = SentenceTransformer(str(path), device="cpu")
    load_encoder(MODEL)  # loading is not what we measure

    def ours() -> np.ndarray:
        return embed(texts, model=MODEL, batch_size=args.batch_size)

    def theirs() -> np.ndarray:
        return st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False)

    warm = texts[: 4 * args.batch_size]
    embed(warm, model=MODEL, batch_size=args.batch_size)
    st.encode(warm, batch_size=args.batch_size, show_progress_bar=False)
    engines: list[tuple[str, Callable[[], np.ndarray]]] = [("lmforge", ours), ("sentence-transformers", theirs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ov_engine = openvino_encoder(str(path), texts, args.batch_size)
    notes = []
    if ov_engine is None:
        notes.append("OpenVINO row skipped: `openvino` is not installed (pip install -e \".[bench]\")")
    else:
        name = f"OpenVINO ({ov_engine[1]})"
        engines.append((name, ov_engine[0]))
        ov_engine[0]()  # warm-up: the first inference compiles its kernels

    times: dict[str, list[float]] = {name: [] for name, _ in engines}
    results: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for run in range(args.runs):
            for name, fn in engines if run % 2 == 0 else engines[::-1]:
                seconds, results[name] = timed(fn)
                times[name].append(seconds)

    def max_distance(a: np.ndarray, b: np.ndarray) -> float:  # 1 - cosine, worst sentence
        return float(1 - ((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())

    _, tok = load_encoder(MODEL)
    mean_tokens = statistics.mean(len(ids) for ids in tok.encode_batch(texts))

    table = Table(title=f"all-MiniLM-L6-v2, {args.n} sentences (~{mean_tokens:.0f} tokens), batch "
                        f"{args.batch_size}, fp32, {torch.get_num_threads()} threads")
    table.add_column("engine")
    table.add_column("best sent/s", justify="right")
    table.add_column("median sent/s", justify="right")
    table.add_column("vs ST", justify="right")  # median of the per-pair ratios
    table.add_column("lmforge vs it", justify="right")
    table.add_column("max 1-cos vs ST", justify="right")
    reference = times["sentence-transformers"]
    for name, t in times.items():
        ratio = statistics.median(r / s for r, s in zip(reference, t, strict=True))
        ours_vs = statistics.median(r / s for r, s in zip(t, times["lmforge"], strict=True))
        table.add_row(name, f"{args.n / min(t):.0f}", f"{args.n / statistics.median(t):.0f}", f"{ratio:.2f}x",
                      "" if name == "lmforge" else f"{ours_vs:.2f}x",
                      f"{max_distance(results[name], results['sentence-transformers']):.1e}")
    console = Console()
    console.print(table)
    for note in notes:
        console.print(note)


if __name__ == "__main__":
    main()
