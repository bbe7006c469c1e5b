"""Sentence-embedding throughput on the shipped all-MiniLM-L6-v2: lmforge `embed` vs sentence-transformers
`encode`, on the same weights in the same process, same batch size, fp32, CPU.

The sentences are generated (seeded): ~20 words each from a mixed vocabulary. Both engines are warmed up,
then timed in pairs of back-to-back passes over all sentences (alternating which goes first), so a busy
host slows both alike. The table shows each engine's best and median pass and the median of the per-pair
speed ratios, the figure least moved by other load on the machine.

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

    times: dict[str, list[float]] = {"lmforge": [], "sentence-transformers": []}
    results: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engines = [("lmforge", ours), ("sentence-transformers", theirs)]
        for run in range(args.runs):
            for name, fn in engines if run % 2 == 0 else engines[::-1]:
                seconds, results[name] = timed(fn)
                times[name].append(seconds)

    a, b = results["lmforge"], results["sentence-transformers"]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    _, tok = load_encoder(MODEL)
    mean_tokens = statistics.mean(len(ids) for ids in tok.encode_batch(texts))

    table = Table(title=f"all-MiniLM-L6-v2, {args.n} sentences (~{mean_tokens:.0f} tokens), batch "
                        f"{args.batch_size}, fp32, {torch.get_num_threads()} threads")
    table.add_column("engine")
    table.add_column("best sent/s", justify="right")
    table.add_column("median sent/s", justify="right")
    table.add_column("vs ST", justify="right")  # median of the per-pair ratios
    reference = times["sentence-transformers"]
    for name, t in times.items():
        ratio = statistics.median(r / s for r, s in zip(reference, t, strict=True))
        table.add_row(name, f"{args.n / min(t):.0f}", f"{args.n / statistics.median(t):.0f}", f"{ratio:.2f}x")
    console = Console()
    console.print(table)
    console.print(f"min cosine(lmforge, sentence-transformers) over all sentences: {cosine.min():.6f}")


if __name__ == "__main__":
    main()
