"""DPO training throughput (pairs/s): `lmforge align dpo` vs TRL's `DPOTrainer`, one after the other in one run.

Both train a LoRA adapter (r 16, alpha 32, every linear layer of the blocks, dropout 0) on SmolLM2-135M-Instruct at
float32 on the CPU, with the sigmoid DPO loss, beta 0.1, lr 5e-5, 4 pairs per optimizer step (no accumulation),
weight decay 0, grad-norm clip 1.0 and the same max length (--max-length, passed to both). The data are --pairs
synthetic preference pairs made from templates (capitals, opposites, colours, legs, sums, planets; seeded, written
to .cache/align-bench/pairs.jsonl): the prompt a short factual question, "chosen" a short correct answer of a few
words, "rejected" a rambling answer of 40-80 words. No model samples anything: throughput does not depend on the
text. Both render every pair through the model's own chat template (the question as the user turn, the answer as
the assistant turn; TRL takes them in its conversational format).

- lmforge: `lmforge align dpo --model smollm2-135m-instruct --data PAIRS --out DIR --method lora --rank 16
  --alpha 32 --lora-dropout 0 --loss sigmoid --beta 0.1 --lr 5e-5 --batch-size 4 --steps N --max-len L
  --weight-decay 0 --grad-clip 1.0 --precision fp32 --val-fraction 0 --quiet` in a subprocess (the venv's `lmforge`
  script; lmforge's --max-len rejects a longer pair where TRL cuts it: the notes say how many pairs are longer).
  Its DIR/metrics.jsonl holds one line per optimizer step with that step's wall time ("seconds": fetching the
  batch, forward, backward, clipping, AdamW); pairs/s = 4 / the median over the steps after the first 2. lmforge
  computes the reference log-probs once, before training; their cost (result.json's "ref_seconds") is given in a
  note: outside the steps, inside wall s. The row is skipped, with a note, when the command fails.
- TRL: `DPOTrainer(model, args=DPOConfig(...), train_dataset=..., processing_class=tokenizer, peft_config=LoraConfig(
  r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))` on the model
  transformers loads from the same GGUF file: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
  dtype=torch.float32, quantization_config=GgufConfig(gguf_file=name, dequantize=True))`, dense float32 weights as
  lmforge's loader makes them (without dequantize=True the model stays marked GGUF-quantized and the Trainer refuses
  to train it); the tokenizer from the same file; nothing is downloaded (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).
  DPOConfig: per_device_train_batch_size 4, gradient_accumulation_steps 1, learning_rate 5e-5, beta 0.1, loss_type
  sigmoid, max_length L, max_steps N, use_cpu, bf16 and fp16 off, gradient_checkpointing off (TRL's default is on,
  which recomputes every block in the backward pass; lmforge does not checkpoint, so off is the like-for-like step),
  dataloader_num_workers 0, no eval, no saving, no logging, report_to none, seed 0; the rest TRL's defaults (AdamW
  as transformers picks it, weight decay 0, linear decay, grad-norm clip 1.0, dropout disabled, SDPA attention).
  With a PEFT model and no ref_model, TRL computes the reference log-probs in every step: one extra no-grad forward
  of the batch with the adapters disabled (precompute_ref_log_probs=False, its default, is what this measures;
  --trl-precompute-ref switches to one pass over the data before training, as lmforge does, and its cost is then
  given in a note). A TrainerCallback notes time.perf_counter() at each on_step_end: a step is the time from the
  previous step's end to its own (fetching and collating the batch, the policy forward and backward, the reference
  forward, clipping and AdamW, the Trainer's bookkeeping); pairs/s = 4 / the median over the steps after the
  first 2. The row is skipped, with a note, when trl is not importable (`.venv/bin/pip install trl`).

"vs TRL" is lmforge's pairs/s over TRL's in the same run (goal >= 1.5x). "wall s" is each engine's whole run: for
lmforge the subprocess (interpreter start, model load, reference pass, training, writing the adapter), for TRL
loading the model, building the trainer (tokenizing the data) and training.

    .venv/bin/python benchmarks/align.py [--pairs 64] [--steps 12] [--max-length 256] [--only lmforge|trl]
                                         [--trl-precompute-ref] [--format table|json]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub: nothing may be downloaded
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantizing bar, TRL's reference pass bar

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from host import load_average, machine  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from lmforge.weights.registry import resolve  # noqa: E402

MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "align-bench"
OURS, PEER = "lmforge", "TRL DPOTrainer"
BATCH, LR, BETA, RANK, ALPHA = 4, 5e-5, 0.1, 16, 32
SKIP_STEPS = 2  # the first steps allocate optimizer state and warm the allocator: left out of the median


# ---- the pairs ------------------------------------------------------------------------------------------


CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Egypt": "Cairo", "Russia": "Moscow", "Canada": "Ottawa", "Greece": "Athens", "Portugal": "Lisbon",
            "England": "London", "China": "Beijing", "Norway": "Oslo", "Ireland": "Dublin", "Austria": "Vienna"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
             "open": "closed", "early": "late", "wet": "dry", "old": "young", "hard": "soft", "full": "empty"}
COLOURS = {"a banana": "yellow", "grass": "green", "snow": "white", "coal": "black", "a ripe tomato": "red",
           "the sky on a clear day": "blue", "milk": "white", "a lemon": "yellow", "a frog": "green"}
LEGS = {"a spider": "eight", "a dog": "four", "a chicken": "two", "an ant": "six", "a snake": "no",
        "a cat": "four", "a bird": "two", "a beetle": "six", "an octopus": "eight", "a horse": "four"}
PLANETS = {"closest to the Sun": "Mercury", "largest": "Jupiter", "known as the Red Planet": "Mars",
           "with the most famous rings": "Saturn", "we live on": "Earth", "hottest": "Venus"}
RAMBLE = [
    "That is a question that many people have asked over the years, and it deserves a careful answer.",
    "Before answering, it helps to think about {topic} from a few different angles.",
    "Some sources describe {topic} in one way, while others take a slightly different view.",
    "Historically, people have had many ideas about {topic}, and not all of them were correct.",
    "It is worth remembering that knowledge changes over time as we learn more.",
    "Teachers often use {topic} as an example when they explain how to look facts up.",
    "If you want to be completely sure, you could check an encyclopedia or a trusted website.",
    "There is a lot of interesting detail here, and I could say much more about it.",
    "Many students find {topic} confusing at first, which is perfectly normal.",
    "In everyday conversation people rarely stop to think about {topic} at all.",
    "The short version is not always the whole story, so let me add some context.",
    "Of course, the answer may also depend on how exactly the question is understood.",
    "Experts generally agree on the main points, although they sometimes argue about the details.",
    "I hope this helps you think about {topic} a little more clearly than before.",
    "Thinking about {topic} can lead to a surprising number of further questions.",
]


def make_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n {"prompt", "chosen", "rejected"} pairs from the templates in turn: a short right answer, a long ramble."""
    rng = random.Random(seed)

    def capital() -> tuple[str, str, str]:
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", f"The capital is {CAPITALS[country]}.", f"the capital of {country}"

    def opposite() -> tuple[str, str, str]:
        word = rng.choice(sorted(OPPOSITES))
        return f"What is the opposite of {word}?", f"The opposite is {OPPOSITES[word]}.", f"the word {word}"

    def colour() -> tuple[str, str, str]:
        thing = rng.choice(sorted(COLOURS))
        return f"What colour is {thing}?", f"It is {COLOURS[thing]}.", thing

    def legs() -> tuple[str, str, str]:
        animal = rng.choice(sorted(LEGS))
        return f"How many legs does {animal} have?", f"It has {LEGS[animal]} legs.", animal

    def addition() -> tuple[str, str, str]:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", "adding numbers"

    def planet() -> tuple[str, str, str]:
        which = rng.choice(sorted(PLANETS))
        return f"Which planet is {which}?", f"It is {PLANETS[which]}.", "the planets"

    def ramble(topic: str) -> str:
        target = rng.randint(40, 80)
        words: list[str] = []
        for sentence in rng.sample(RAMBLE, len(RAMBLE)):
            words += sentence.format(topic=topic).split()
            if len(words) >= target:
                break
        return " ".join(words[:target]).rstrip(".,") + "."

    templates = [capital, opposite, colour, legs, addition, planet]
    pairs = []
    for i in range(n):
        question, right, topic = templates[i % len(templates)]()
        pairs.append({"prompt": question, "chosen": right, "rejected": ramble(topic)})
    return pairs


def write_pairs(n: int) -> Path:
    path = CACHE / "pairs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(p) + "\n" for p in make_pairs(n))
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def conversational(pair: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """TRL's conversational preference format: the same turns lmforge renders through the chat template."""
    return {"prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


# ---- the engines ----------------------------------------------------------------------------------------


@dataclass
class Result:
    engine: str
    pairs_s: float = float("nan")
    step_s: float = float("nan")  # median seconds per optimizer step over the timed steps
    timed_steps: int = 0
    seconds: list[float] = field(default_factory=list)  # every step's time, the untimed first ones included
    ref: str = ""  # how the reference log-probs are computed
    ref_s: float | None = None  # one-off reference pass before training, where there is one
    wall_s: float = float("nan")
    ratio: float | None = None
    skipped: str | None = None

    def finish(self) -> None:
        timed = self.seconds[SKIP_STEPS:]
        self.timed_steps = len(timed)
        self.step_s = statistics.median(timed)
        self.pairs_s = BATCH / self.step_s


def lmforge_command(data: Path, out: Path, args: argparse.Namespace) -> list[str]:
    script = Path(sys.executable).with_name("lmforge")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "lmforge"]
    return [*head, "align", "dpo", "--model", MODEL, "--data", str(data), "--out", str(out), "--method", "lora",
            "--rank", str(RANK), "--alpha", str(ALPHA), "--loss", "sigmoid", "--beta", str(BETA), "--lr", str(LR),
            "--lora-dropout", "0", "--batch-size", str(BATCH), "--steps", str(args.steps), "--max-len",
            str(args.max_length), "--weight-decay", "0", "--grad-clip", "1.0", "--precision", "fp32",
            "--val-fraction", "0", "--quiet"]


def run_lmforge(data: Path, args: argparse.Namespace, notes: list[str]) -> Result:
    out = CACHE / "lmforge-run"
    shutil.rmtree(out, ignore_errors=True)
    command = lmforge_command(data, out, args)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return Result(OURS, skipped=f"`lmforge align dpo` ran past --timeout {args.timeout}s")
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        lines = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if x.strip()]
        why = lines[-1][:200] if lines else "no output"
        return Result(OURS, skipped=f"`lmforge align dpo` exited {proc.returncode}: {why}")
    metrics = out / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    seconds = [float(r["seconds"]) for r in sorted((r for r in rows if "seconds" in r), key=lambda r: r["step"])]
    if len(seconds) <= SKIP_STEPS:
        return Result(OURS, skipped=f"{metrics.relative_to(ROOT)} has {len(seconds)} step(s) with \"seconds\", "
                                    f"{SKIP_STEPS + 1} or more are needed")
    r = Result(OURS, seconds=seconds, wall_s=wall, ref="once, before training")
    result_file = out / "result.json"
    if result_file.exists():
        summary = json.loads(result_file.read_text())
        if isinstance(summary, dict) and summary.get("trainable") is not None:
            notes.append(f"lmforge: trainable {summary['trainable']}")
        if isinstance(summary, dict) and summary.get("ref_seconds") is not None:
            r.ref_s = float(summary["ref_seconds"])
            notes.append(f"lmforge: the reference log-probs of the pairs take {r.ref_s:.2f} s once, before training "
                         "(result.json's ref_seconds; outside the timed steps, inside wall s)")
    r.finish()
    return r


def trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return getattr(trl, "__version__", "unknown")


def run_trl(pairs: list[dict[str, str]], args: argparse.Namespace, notes: list[str]) -> Result:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    hf_logging.disable_progress_bar()

    class StepClock(TrainerCallback):
        """Each optimizer step's time: from the previous step's end (or the first step's begin) to its own end."""

        def __init__(self) -> None:
            self.last: float | None = None
            self.seconds: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.last is None:
                self.last = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

    class TimedDPOTrainer(DPOTrainer):
        """DPOTrainer, noting how long its precompute_ref_log_probs pass (run inside __init__) takes."""

        ref_seconds = 0.0

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            TimedDPOTrainer.ref_seconds += time.perf_counter() - t
            return out

    start = time.perf_counter()
    path = resolve(MODEL)
    # dequantize=True: the same float32 weights as without it, but the model is not left marked as a GGUF-quantized
    # one, which transformers' Trainer refuses to train ("QuantizationMethod.GGUF ... do not support training")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(gguf_file=path.name, dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="trl-dpo-") as scratch:
        config = DPOConfig(
            output_dir=scratch, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
            learning_rate=LR, beta=BETA, loss_type=["sigmoid"], max_length=args.max_length, max_steps=args.steps,
            precompute_ref_log_probs=args.trl_precompute_ref, use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=False, dataloader_num_workers=0, eval_strategy="no", save_strategy="no",
            logging_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        )
        trainer = TimedDPOTrainer(model=model, args=config,
                                  train_dataset=Dataset.from_list([conversational(p) for p in pairs]),
                                  processing_class=tokenizer, peft_config=peft_config, callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary dict to stdout
        trainer.train()
    wall = time.perf_counter() - start
    ref_s = TimedDPOTrainer.ref_seconds if args.trl_precompute_ref else None
    lengths = [len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
               for row in trainer.train_dataset]
    notes.append(f"TRL's tokenization: prompt + longer answer {min(lengths)}-{max(lengths)} tokens "
                 f"(mean {statistics.mean(lengths):.0f}); --max-length {args.max_length} cuts "
                 f"{sum(n > args.max_length for n in lengths)} of {len(lengths)} pairs")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    notes.append(f"TRL: {trainable:,} trainable LoRA parameters; "
                 f"optimizer {getattr(config.optim, 'value', config.optim)}, "
                 f"lr schedule {getattr(config.lr_scheduler_type, 'value', config.lr_scheduler_type)}, "
                 f"max_grad_norm {config.max_grad_norm}, attention {model.config._attn_implementation}")
    if len(clock.seconds) <= SKIP_STEPS:
        return Result(PEER, skipped=f"TRL ran {len(clock.seconds)} step(s), {SKIP_STEPS + 1} or more are needed")
    r = Result(PEER, seconds=clock.seconds, wall_s=wall, ref_s=ref_s,
               ref="once, before training" if args.trl_precompute_ref else "every step (adapters off, no grad)")
    if ref_s is not None:
        notes.append(f"TRL: precompute_ref_log_probs pass over all {len(pairs)} pairs: {ref_s:.2f} s once, before "
                     "training (inside DPOTrainer(...); outside the timed steps, inside wall s)")
    r.finish()
    return r


# ---- report ---------------------------------------------------------------------------------------------


def print_table(header: dict[str, Any], results: list[Result], notes: list[str], console: Console) -> None:
    for key, value in header.items():
        console.print(f"[bold]{key}:[/bold] {escape(str(value))}")
    table = Table(title=f"SmolLM2-135M-Instruct DPO (LoRA r {RANK}, float32, CPU), batch {BATCH} pairs, "
                        f"{header['steps']} steps, median over the steps after the first {SKIP_STEPS}",
                  caption="vs TRL: lmforge's pairs/s over TRL DPOTrainer's in the same run; goal >= 1.5x")
    for col in ("engine", "pairs/s", "s / step", "timed steps", "vs TRL", "reference log-probs", "wall s"):
        table.add_column(col, justify="left" if col in ("engine", "reference log-probs") else "right")
    for r in results:
        if r.skipped:
            table.add_row(r.engine, "skipped", "(see below)", "", "", "", "")
            continue
        table.add_row(r.engine, f"{r.pairs_s:.3f}", f"{r.step_s:.2f}", str(r.timed_steps),
                      f"{r.ratio:.2f}x" if r.ratio is not None else "", r.ref, f"{r.wall_s:.1f}")
    console.print(table)
    for note in notes:
        console.print(note, markup=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=64, help="synthetic preference pairs to write and train on")
    ap.add_argument("--steps", type=int, default=12,
                    help=f"optimizer steps per engine ({BATCH} pairs each); the first {SKIP_STEPS} are not timed")
    ap.add_argument("--max-length", type=int, default=256, help="max tokens of prompt + answer, for both engines")
    ap.add_argument("--only", choices=["lmforge", "trl"], help="measure one engine (the other's row is skipped)")
    ap.add_argument("--trl-precompute-ref", action="store_true",
                    help="TRL computes the reference log-probs once before training (precompute_ref_log_probs=True) "
                         "instead of in every step, as lmforge does")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds the lmforge subprocess may take")
    ap.add_argument("--format", choices=["table", "json"], default="table")
    args = ap.parse_args()
    if args.pairs < BATCH or args.steps <= SKIP_STEPS or args.max_length < 16:
        ap.error(f"--pairs must be >= {BATCH}, --steps > {SKIP_STEPS}, --max-length >= 16")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "peft", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    console = Console(width=130, stderr=args.format == "json")

    pairs = make_pairs(args.pairs)
    data = write_pairs(args.pairs)
    notes: list[str] = []
    version = trl_version()
    results: list[Result] = []
    # one after the other, never together: each has the host's cores to itself
    if args.only == "trl":
        results.append(Result(OURS, skipped="--only trl"))
    else:
        with console.status(f"lmforge align dpo: {args.steps} steps ..."):
            results.append(run_lmforge(data, args, notes))
    if args.only == "lmforge":
        results.append(Result(PEER, skipped="--only lmforge"))
    elif version is None:
        results.append(Result(PEER, skipped="trl not importable"))
        notes.append("TRL row skipped: trl is not importable (.venv/bin/pip install trl)")
    else:
        with console.status(f"TRL DPOTrainer: {args.steps} steps ..."):
            results.append(run_trl(pairs, args, notes))
    for r in results:
        if r.skipped and not r.skipped.startswith(("--only", "trl not")):
            notes.append(f"{r.engine} row skipped: {r.skipped}")
    ours, peer = results
    if not ours.skipped and not peer.skipped:
        ours.ratio = ours.pairs_s / peer.pairs_s

    header = {
        "machine": machine(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load average": load_average(),
        "torch threads": torch.get_num_threads(),
        "versions": f"torch {torch.__version__}, trl {version or 'not installed'}"
                    + (f", transformers {__import__('transformers').__version__}, peft "
                       f"{__import__('peft').__version__}" if version else ""),
        "model": f"{MODEL} ({resolve(MODEL).name}, dequantized to float32 by both)",
        "pairs": args.pairs, "steps": args.steps, "max length": args.max_length,
        "data": str(data.relative_to(ROOT)),
    }
    if args.format == "json":
        rows = [{k: None if isinstance(v, float) and v != v else v for k, v in asdict(r).items()} for r in results]
        print(json.dumps({**header, "results": rows, "notes": notes}, indent=2))  # NaN (skipped) -> null
    else:
        print_table(header, results, notes, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
