"""Multiple-choice log-likelihood throughput (items/s): lmforge's `choice` eval vs lm-eval-harness's HF backend.

Both engines score the same rows, in this one process, on the same weights (SmolLM2-135M-Instruct) at float32,
so the host's speed of the day cancels out of their ratio. The rows are N synthetic 4-option questions made from
templates (animals, fruit, capitals, sums, opposites, colours, legs; seeded, written to
.cache/eval-bench/choice-N.jsonl), e.g. "Question: Which of these animals is a mammal?\\nAnswer:" with options
whale / trout / eagle / frog.

- lmforge: `lmforge.eval.harness.evaluate(rows, kind="choice", ...)` on the model from
  `load("smollm2-135m-instruct", dtype=...)`, timed from the JSONL file to the summary (tokenizing included).
  Rows go through the model as prefix trees: prompts and options packed into one row per forward, each token
  seeing only its own sequence's earlier tokens, so every shared prefix (a repeated question, a template's
  common start, options that begin alike) runs once and nothing is padded (--batch-size only sets how many rows
  go between progress updates there). Rows for float32 and int4.
- lm-eval: `HFLM(pretrained=<HF folder>, device="cpu", batch_size=B, dtype="float32").loglikelihood(requests)`
  with the same (context, " option") pairs lmforge scores (lm-eval's own multiple_choice convention: the
  continuation is target_delimiter " " + choice), timed around that call: exactly the log-likelihood work, the
  requests already built. The HF folder is lmforge's own export of the same weights (`lmforge.weights.load.convert`
  into .cache/eval-bench/smollm2-hf/, once); nothing is downloaded (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).
  One row per --batch-size (a comma list measures several); "vs lm-eval" is against the fastest of them.
  The rows are skipped, with a note, when lm_eval is not importable (`pip install "lm-eval[hf]"`).

A prediction is the option with the highest summed log-likelihood (acc; ties go to the first); "same picks"
is the share of rows where an engine picks what lmforge float32 picks, and the notes give the largest difference
in any option's log-likelihood between the two float32 engines. Each engine gets a warm-up pass on a few rows;
the --runs timed passes are interleaved (lmforge, lm-eval, lmforge int4, then again) and the median is reported.

    .venv/bin/python benchmarks/eval.py [--items 200] [--batch-size 16 | 1,16] [--runs 3] [--dtypes float32,int4]
                                        [--format table|json]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub: nothing may be downloaded
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from host import load_average, machine
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from lmforge.eval.harness import evaluate, read_examples, split_pair  # noqa: E402
from lmforge.weights.load import convert, load  # noqa: E402

MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "eval-bench"
HF_FOLDER = CACHE / "smollm2-hf"
OURS, PEER = "lmforge", "lm-eval (HFLM)"
WARMUP_ROWS = 8


# ---- the rows -------------------------------------------------------------------------------------------


MAMMALS = ["dog", "cat", "horse", "cow", "whale", "bat", "elephant", "rabbit", "lion", "mouse", "goat", "bear"]
NOT_MAMMALS = ["trout", "eagle", "lizard", "frog", "shark", "snake", "parrot", "salmon", "turtle", "ant", "crab",
               "owl"]
FRUIT = ["apple", "banana", "orange", "pear", "grape", "mango", "cherry", "peach", "plum", "lemon"]
NOT_FRUIT = ["carrot", "potato", "hammer", "chair", "onion", "pencil", "brick", "shoe", "spoon", "cabbage"]
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Egypt": "Cairo", "Russia": "Moscow", "Canada": "Ottawa", "Greece": "Athens", "Portugal": "Lisbon",
            "England": "London", "China": "Beijing", "Norway": "Oslo", "Ireland": "Dublin", "Austria": "Vienna"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
             "open": "closed", "early": "late", "wet": "dry", "old": "young", "hard": "soft", "full": "empty"}
COLOURS = {"a banana": "yellow", "grass": "green", "snow": "white", "coal": "black", "a ripe tomato": "red",
           "the sky on a clear day": "blue", "an orange": "orange", "milk": "white", "a lemon": "yellow",
           "a frog": "green"}
LEGS = {"a spider": "eight", "a dog": "four", "a chicken": "two", "an ant": "six", "a snake": "zero",
        "a cat": "four", "a bird": "two", "a beetle": "six", "an octopus": "eight", "a horse": "four"}
NUMBERS = ["zero", "two", "four", "six", "eight", "ten"]
COLOUR_NAMES = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]


def make_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n 4-option questions from the templates in turn, the right option at a random place."""
    rng = random.Random(seed)

    def pick(pool: list[str], right: str, k: int = 3) -> list[str]:
        return rng.sample([x for x in pool if x != right], k)

    def mammal() -> tuple[str, str, list[str]]:
        right = rng.choice(MAMMALS)
        return "Which of these animals is a mammal?", right, pick(NOT_MAMMALS, right)

    def fruit() -> tuple[str, str, list[str]]:
        right = rng.choice(FRUIT)
        return "Which of these is a fruit?", right, pick(NOT_FRUIT, right)

    def capital() -> tuple[str, str, list[str]]:
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", CAPITALS[country], pick(list(CAPITALS.values()),
                                                                             CAPITALS[country])

    def addition() -> tuple[str, str, list[str]]:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        wrong = rng.sample([a + b + d for d in (-3, -2, -1, 1, 2, 3) if a + b + d >= 0], 3)
        return f"What is {a} plus {b}?", str(a + b), [str(w) for w in wrong]

    def opposite() -> tuple[str, str, list[str]]:
        word = rng.choice(sorted(OPPOSITES))
        return f"What is the opposite of {word}?", OPPOSITES[word], pick(list(OPPOSITES.values()), OPPOSITES[word])

    def colour() -> tuple[str, str, list[str]]:
        thing = rng.choice(sorted(COLOURS))
        return f"What colour is {thing}?", COLOURS[thing], pick(COLOUR_NAMES, COLOURS[thing])

    def legs() -> tuple[str, str, list[str]]:
        animal = rng.choice(sorted(LEGS))
        return f"How many legs does {animal} have?", LEGS[animal], pick(NUMBERS, LEGS[animal])

    templates = [mammal, fruit, capital, addition, opposite, colour, legs]
    rows = []
    for i in range(n):
        question, right, wrong = templates[i % len(templates)]()
        options = [right, *wrong]
        rng.shuffle(options)
        rows.append({"input": f"Question: {question}\nAnswer:", "options": options, "target": options.index(right)})
    return rows


def write_rows(n: int) -> Path:
    path = CACHE / f"choice-{n}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in make_rows(n))
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


# ---- the engines ----------------------------------------------------------------------------------------


@dataclass
class Result:
    engine: str
    dtype: str
    items: int
    batch_size: int | None = None  # lm-eval's HFLM batch_size (lmforge scores one row at a time)
    seconds: list[float] = field(default_factory=list)  # one per timed run
    load_s: float = 0.0
    acc: float = float("nan")
    same_picks: float | None = None  # share of rows picked as lmforge float32 picks them
    items_s: float = float("nan")
    ratio: float | None = None  # items/s over the fastest lm-eval row's
    loglik: list[list[float]] = field(default_factory=list, repr=False)
    skipped: str | None = None


class Lmforge:
    def __init__(self, dtype: str, data: Path, batch_size: int, warmup: Path) -> None:
        start = time.perf_counter()
        self.model, self.tokenizer = load(MODEL, dtype=dtype)
        self.result = Result(OURS, dtype, 0, load_s=time.perf_counter() - start)
        self.data, self.batch_size = data, batch_size
        self.call(warmup)

    def call(self, data: Path) -> Any:
        return evaluate(data, kind="choice", model=self.model, tokenizer=self.tokenizer, batch_size=self.batch_size)

    def run(self) -> None:
        start = time.perf_counter()
        out = self.call(self.data)
        self.result.seconds.append(time.perf_counter() - start)
        self.result.items = out.n
        self.result.acc = out.score
        self.result.loglik = [r["loglik"] for r in out.records]


def lm_eval_version() -> str | None:
    try:
        import lm_eval
    except ImportError:
        return None
    return getattr(lm_eval, "__version__", "unknown")


def hf_folder(console: Console) -> Path:
    """lmforge's float32 HF export of the model, made once: the folder lm-eval loads (never the hub)."""
    if not (HF_FOLDER / "config.json").is_file():
        with console.status(f"converting {MODEL} to an HF folder in {HF_FOLDER} ..."):
            convert(MODEL, HF_FOLDER, dtype="float32", force=True)
    return HF_FOLDER


class LmEval:
    def __init__(self, folder: Path, rows: list[Any], batch_size: int) -> None:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        start = time.perf_counter()
        self.lm = HFLM(pretrained=str(folder), device="cpu", batch_size=batch_size, dtype="float32")
        self.result = Result(PEER, "float32", len(rows), batch_size=batch_size,
                             load_s=time.perf_counter() - start)
        # (context, continuation) as lm-eval's multiple_choice builds them: doc_to_text, then " " + each choice
        pairs = [(ex.prompt, " " + option) for ex in rows for option in ex.options]
        self.requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
        self.shape = [len(ex.options) for ex in rows]
        self.lm.loglikelihood(self.requests[: 4 * WARMUP_ROWS], disable_tqdm=True)

    def run(self) -> None:
        start = time.perf_counter()
        out = self.lm.loglikelihood(self.requests, disable_tqdm=True)
        self.result.seconds.append(time.perf_counter() - start)
        flat = [logp for logp, _ in out]
        self.result.loglik, at = [], 0
        for n in self.shape:
            self.result.loglik.append(flat[at : at + n])
            at += n


def picks(loglik: list[list[float]]) -> list[int]:
    return [int(np.argmax(row)) for row in loglik]  # argmax: ties go to the first, as in both harnesses


# ---- report ---------------------------------------------------------------------------------------------


def print_table(header: dict[str, Any], results: list[Result], notes: list[str], console: Console) -> None:
    for key, value in header.items():
        console.print(f"[bold]{key}:[/bold] {escape(str(value))}")
    table = Table(title=f"SmolLM2-135M-Instruct multiple-choice log-likelihood, {header['items']} 4-option rows, "
                        f"median of {header['runs']}",
                  caption="vs lm-eval: items/s over lm-eval's fastest row (HFLM, float32) in the same run; goal >= 2x")
    for col in ("engine", "dtype", "batch", "items/s", "s / run", "acc", "same picks", "vs lm-eval", "load s"):
        table.add_column(col, justify="left" if col in ("engine", "dtype") else "right")
    for r in results:
        if r.skipped:
            table.add_row(r.engine, r.dtype, "", "skipped", "(see below)", "", "", "", "")
            continue
        table.add_row(r.engine, r.dtype, str(r.batch_size) if r.batch_size else "all rows", f"{r.items_s:,.1f}",
                      f"{statistics.median(r.seconds):.2f}", f"{r.acc:.3f}",
                      f"{r.same_picks:.1%}" if r.same_picks is not None else "",
                      f"{r.ratio:.2f}x" if r.ratio is not None else "", f"{r.load_s:.2f}")
    console.print(table)
    for note in notes:
        console.print(note, markup=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200, help="synthetic 4-option rows to score")
    ap.add_argument("--batch-size", default="16",
                    help="lm-eval's HFLM batch_size (requests per forward); a comma list gives a row each, e.g. 1,16")
    ap.add_argument("--runs", type=int, default=3, help="timed passes per engine (median reported)")
    ap.add_argument("--dtypes", default="float32,int4", help="lmforge precisions to measure")
    ap.add_argument("--skip-lm-eval", action="store_true", help="measure lmforge only")
    ap.add_argument("--format", choices=["table", "json"], default="table")
    args = ap.parse_args()
    try:
        batch_sizes = [int(b) for b in args.batch_size.split(",") if b.strip()]
    except ValueError:
        ap.error("--batch-size takes whole numbers, comma-separated")
    if args.items < 1 or args.runs < 1 or not batch_sizes or min(batch_sizes) < 1:
        ap.error("--items, --batch-size and --runs must be >= 1")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()] or ["float32"]
    warnings.filterwarnings("ignore")
    for name in ("lm-eval", "lm_eval", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    console = Console(width=130, stderr=args.format == "json")

    data, warmup = write_rows(args.items), write_rows(WARMUP_ROWS)
    rows = read_examples(data, "choice")
    notes: list[str] = []
    version = lm_eval_version()
    with console.status("loading ..."):
        ours = [Lmforge(d, data, max(batch_sizes), warmup) for d in dtypes]
        peers: list[LmEval] = []
        if args.skip_lm_eval:
            notes.append("lm-eval row skipped: --skip-lm-eval")
        elif version is None:
            notes.append('lm-eval row skipped: lm_eval is not importable (.venv/bin/pip install "lm-eval[hf]")')
        else:
            folder = hf_folder(console)
            peers = [LmEval(folder, rows, b) for b in batch_sizes]
    engines: list[Any] = [*ours[:1], *peers, *ours[1:]]
    if peers:  # the same (context, continuation) tokens on both sides? lmforge's split_pair, lm-eval's _encode_pair
        differ = sum(split_pair(ours[0].tokenizer, ex.prompt, o) != peers[0].lm._encode_pair(ex.prompt, " " + o)
                     for ex in rows for o in ex.options)
        notes.append(f"tokens: {differ} of {len(peers[0].requests)} (context, continuation) pairs tokenize "
                     "differently between lmforge's split_pair and lm-eval's _encode_pair")

    for run in range(args.runs):  # interleaved, so a change in the machine's load hits every engine alike
        for engine in engines:
            r = engine.result
            label = f"{r.engine} {r.dtype}" + (f" batch {r.batch_size}" if r.batch_size else "")
            with console.status(f"run {run + 1}/{args.runs}: {label} ..."):
                engine.run()

    results = [e.result for e in engines]
    if not peers:
        results.insert(1, Result(PEER, "float32", 0, skipped="lm_eval not importable" if version is None
                                 else "--skip-lm-eval"))
    base = next((r for r in results if r.engine == OURS and r.dtype == "float32"), None)
    truth = [ex.target for ex in rows]
    for r in results:
        if r.skipped:
            continue
        r.items_s = len(rows) / statistics.median(r.seconds)
        chosen = picks(r.loglik)
        r.acc = float(np.mean([c == t for c, t in zip(chosen, truth, strict=True)]))
        if base is not None:
            r.same_picks = float(np.mean([a == b for a, b in zip(chosen, picks(base.loglik), strict=True)]))
    if peers:
        fastest = max((p.result for p in peers), key=lambda r: r.items_s)
        for r in results:
            r.ratio = r.items_s / fastest.items_s if r.engine == OURS else None
        if base is not None:
            for p in peers:
                diff = max(abs(a - b) for x, y in zip(base.loglik, p.result.loglik, strict=True)
                           for a, b in zip(x, y, strict=True))
                notes.append(f"log-likelihoods: largest |lmforge float32 - lm-eval batch {p.result.batch_size}| "
                             f"over all {len(p.requests)} options: {diff:.2e} nats")

    header = {
        "machine": machine(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load average": load_average(),
        "torch threads": torch.get_num_threads(),
        "versions": f"torch {torch.__version__}, lm-eval {version or 'not installed'}"
                    + (f", transformers {__import__('transformers').__version__}" if version else ""),
        "model": f"{MODEL} (lmforge: load(dtype=D); lm-eval: HF folder {HF_FOLDER.relative_to(ROOT)}, float32)",
        "items": len(rows), "runs": args.runs, "lm-eval batch_size": ",".join(map(str, batch_sizes)),
        "data": str(data.relative_to(ROOT)),
    }
    if args.format == "json":
        print(json.dumps({**header, "results": [{k: v for k, v in asdict(r).items() if k != "loglik"}
                                                 for r in results], "notes": notes}, indent=2))
    else:
        print_table(header, results, notes, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
