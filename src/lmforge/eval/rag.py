"""`lmforge eval rag`: retrieval (recall@k and MRR of the labelled source), answers (exact match and token F1),
groundedness, and latency percentiles, over a QA file of {"question", "answer", "source"} rows."""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.rag.answer import Generator, answer
from lmforge.rag.retrieve import search
from lmforge.rag.store import Store
from lmforge.textio import jsonl_rows


@dataclass
class QA:
    question: str
    answer: str
    source: str


def read_qa(path: str | Path) -> list[QA]:
    """Rows of {"question", "answer", "source"}; a bad row is an error naming its line."""
    rows = []
    for n, row, _ in jsonl_rows(path):
        if not all(isinstance(row.get(f), str) for f in ("question", "answer", "source")):
            raise LmforgeError(f'{path} line {n}: needs string fields "question", "answer" and "source"')
        rows.append(QA(row["question"], row["answer"], row["source"]))
    if not rows:
        raise LmforgeError(f"{path} holds no QA rows")
    return rows


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, truth: str) -> float:
    pred, gold = normalize(prediction).split(), normalize(truth).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if not pred or not gold or not common:
        return float(pred == gold)
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def same_source(found: str, wanted: str) -> bool:
    """A hit's source (an absolute path, or path#line) is the labelled one: equal, or ending with it as a path."""
    found, wanted = found.replace("\\", "/"), wanted.replace("\\", "/").lstrip("./")
    return found == wanted or found.endswith("/" + wanted)


def evaluate_rag(store: Store, rows: list[QA], generate: Generator | None = None, k: int = 5,
                 embed_model: str | None = None, progress: bool = False) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import Progress

    per_row, search_s, answer_s = [], [], []
    with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("evaluating", total=len(rows))
        for row in rows:
            start = time.perf_counter()
            hits = search(store, row.question, k, embed_model=embed_model)
            search_s.append(time.perf_counter() - start)
            rank = next((h.rank for h in hits if same_source(h.source, row.source)), None)
            result: dict[str, Any] = {**asdict(row), "rank": rank, "retrieved": [h.source for h in hits]}
            if generate is not None:
                start = time.perf_counter()
                got = answer(row.question, store, generate, k=k, embed_model=embed_model)
                answer_s.append(time.perf_counter() - start)
                result.update(prediction=got.text, exact=float(normalize(got.text) == normalize(row.answer)),
                              contains=float(normalize(row.answer) in normalize(got.text)),
                              f1=token_f1(got.text, row.answer), groundedness=got.groundedness, cited=got.cited)
            per_row.append(result)
            bar.advance(task)
    ranks = [r["rank"] for r in per_row]
    summary: dict[str, Any] = {
        "n": len(rows), "k": k, f"recall@{k}": sum(r is not None for r in ranks) / len(ranks),
        "mrr": sum(1 / r for r in ranks if r) / len(ranks),
        "search_ms_p50": 1000 * float(np.percentile(search_s, 50)),
        "search_ms_p95": 1000 * float(np.percentile(search_s, 95)),
    }
    if generate is not None:
        for key in ("exact", "contains", "f1", "groundedness"):
            summary[key] = sum(r[key] for r in per_row) / len(per_row)
        summary["answer_s_p50"] = float(np.percentile(answer_s, 50))
        summary["answer_s_p95"] = float(np.percentile(answer_s, 95))
    return {"summary": summary, "rows": per_row}
