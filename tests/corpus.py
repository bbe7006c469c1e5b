"""A small fixed corpus with structure to learn, for the training tests."""

import random
from pathlib import Path

import numpy as np

from lmforge.data.shards import TokenSplit

# lines are runs of this cycle from a random start: after the first word every word is determined by the one
# before it (and after it), while the unigram distribution over the words is nearly flat
WORDS = ("january february march april may june july august september october november december monday tuesday "
         "wednesday thursday friday saturday sunday one two three four five six seven eight nine ten").split()


def write_corpus(folder: Path, docs: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        lines = []
        for _ in range(rng.randint(3, 8)):
            start, n = rng.randrange(len(WORDS)), rng.randint(5, 15)
            lines.append(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(n)) + ".")
        (folder / f"doc{d:04d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def unigram_entropy(data: Path) -> float:
    """Nats per token of the training split's unigram distribution: what a model that ignores context reaches."""
    split = TokenSplit(data, "train")
    counts = np.bincount(split.read(0, split.n_tokens))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
