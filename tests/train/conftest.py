"""The corpus of tests/corpus.py, its three tokenizers and prepared datasets (built once per session)."""

from pathlib import Path

import pytest
from corpus import write_corpus

from lmforge.data.prepare import prepare
from lmforge.tokenizer_train import save_trained, train_tokenizer

KINDS = {"clm": ("bpe", 400), "mlm": ("wordpiece", 200), "span": ("unigram", 200)}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def datasets(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """objective -> a prepared dataset tokenised for it (BPE / WordPiece / Unigram with sentinels)."""
    root = tmp_path_factory.mktemp("prepared")
    out = {}
    for objective, (kind, size) in KINDS.items():
        tok = save_trained(train_tokenizer([corpus], kind, vocab_size=size), root / f"tok-{kind}")
        out[objective] = root / f"data-{kind}"
        prepare([corpus], tok, out[objective], val_fraction=0.1, workers=1, progress=False,
                max_top_ngram_fraction=1.0)  # the cycle repeats n-grams on purpose
    return out
