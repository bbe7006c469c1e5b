"""Fine-tuning on real weights, measured before vs after on held-out rows, on this CPU.

    .venv/bin/python examples/finetune_real.py format    # LoRA on SmolLM2-135M-Instruct: a JSON format it lacks
    .venv/bin/python examples/finetune_real.py classify  # MiniLM + head: which part of the Python docs a line is from
    .venv/bin/python examples/finetune_real.py domain    # LoRA domain tuning on the Python docs: held-out perplexity

format: 400 training rows "extract name, age and city as JSON" over sentences in 8 shapes, 100 held-out rows
with names and cities never seen in training; greedy answers through the same chat rendering as
`lmforge generate --chat`, scored by exact match (and by parsed-JSON equality, which forgives spacing).
classify: sentences of the Python 3.11 documentation (Debian's python3.11-doc) labelled by the part they come from
(tutorial, library, reference, howto, c-api, faq, whatsnew); the baseline is zero-shot nearest label: the label
name's embedding closest to the sentence's. domain: SmolLM2 on documentation text; perplexity on held-out files.
Results go to runs/finetune-<task>/ and the table is printed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

from lmforge.generate import SamplingParams, complete, encode_prompt
from lmforge.train.finetune import FinetuneOptions, finetune, format_result
from lmforge.train.loop import TrainConfig
from lmforge.weights.load import load

ROOT = Path("runs")
DOCS = Path("/usr/share/doc/python3.11/html/_sources")
INSTRUCTION = "Extract the person's name, age and city as JSON."
NAMES = ("Alice Bruno Chen Dmitri Elena Farah Goran Hana Ivan Julia Kofi Lena Mateo Nadia Oskar Priya Quentin Rosa "
         "Sven Tomas Uma Viktor Wen Yara Zoltan Amara Bjorn Carmen Diego Esther Felix Greta Hugo Ines Jonas Keiko "
         "Luca Maya Nils Olga Pablo Rina Sami Talia Ugo Vera Wim Xena Yusuf Zara").split()
CITIES = ("Paris Berlin Madrid Lisbon Vienna Prague Oslo Dublin Warsaw Athens Rome Zurich Tokyo Seoul Lima Quito "
          "Cairo Nairobi Accra Dakar Lagos Delhi Dhaka Hanoi Manila Sydney Perth Denver Boston Austin Toronto "
          "Montreal Havana Bogota Santiago Helsinki Riga Tallinn Vilnius Sofia").split()
SHAPES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, {age}, moved to {city} last year.",
    "Meet {name} from {city}; {name} turned {age} in May.",
    "In {city} lives {name}, who is {age}.",
    "{name} ({age}) works as a nurse in {city}.",
    "At {age}, {name} opened a bakery in {city}.",
    "The {age}-year-old {name} was born in {city}.",
    "{city} is home to {name}, aged {age}.",
]


def format_rows(n: int, names: list[str], cities: list[str], rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 90)
        text = rng.choice(SHAPES).format(name=name, city=city, age=age)
        answer = json.dumps({"name": name, "age": age, "city": city})
        rows.append({"instruction": INSTRUCTION, "input": text, "output": answer})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scores(model: torch.nn.Module, tok, rows: list[dict[str, str]]) -> tuple[float, float, list[str]]:
    """(exact match, parsed-JSON match, answers) of greedy chat answers, as `generate --chat` would give them."""
    prompts = [encode_prompt(tok, f"{r['instruction']}\n\n{r['input']}", chat=True) for r in rows]
    params = SamplingParams(max_new_tokens=40, temperature=0)
    answers = [c.text.strip() for c in complete(model, tok, prompts, params, max_batch=16)]
    exact = sum(a == r["output"] for a, r in zip(answers, rows, strict=True)) / len(rows)

    def parsed(a: str) -> object:
        m = re.search(r"\{.*\}", a, re.S)
        try:
            return json.loads(m.group(0)) if m else None
        except json.JSONDecodeError:
            return None

    same = sum(parsed(a) == json.loads(r["output"]) for a, r in zip(answers, rows, strict=True)) / len(rows)
    return exact, same, answers


def run_format(args: argparse.Namespace) -> None:
    rng = random.Random(0)
    names, cities = list(NAMES), list(CITIES)
    rng.shuffle(names)
    rng.shuffle(cities)
    # held-out rows use names and cities the training rows never contain: the format must be learned, not recalled
    train_rows = format_rows(400, names[:40], cities[:32], rng)
    test_rows = format_rows(100, names[40:], cities[32:], rng)
    out = ROOT / "finetune-format"
    data = write_jsonl(out / "train.jsonl", train_rows)
    model, tok = load("smollm2-135m-instruct")
    before = scores(model, tok, test_rows)
    del model
    start = time.time()
    opts = FinetuneOptions(model="smollm2-135m-instruct", data=data, task="instruct", out=out / "run", rank=8,
                           alpha=16, max_len=160, merge=True, val_fraction=0.1)
    tc = TrainConfig(steps=args.steps, batch_size=8, lr=args.lr, min_lr=args.lr / 10, warmup=10, eval_every=0,
                     save_every=50)
    result = finetune(opts, tc, progress=True)
    minutes = (time.time() - start) / 60
    print(format_result(result))
    tuned, tok = load(out / "run" / "merged")
    after = scores(tuned, tok, test_rows)
    print(f"\nheld-out 100 rows, greedy, chat-rendered; training took {minutes:.1f} min")
    print(f"exact match      before {before[0]:.0%}  after {after[0]:.0%}")
    print(f"parsed JSON same before {before[1]:.0%}  after {after[1]:.0%}")
    for i in range(3):
        print(f"  {test_rows[i]['input']!r}\n    before: {before[2][i]!r}\n    after:  {after[2][i]!r}")


LABELS = {"tutorial": "the Python tutorial", "library": "the library reference", "reference": "the language reference",
          "howto": "a how-to guide", "c-api": "the C API reference", "faq": "frequently asked questions",
          "whatsnew": "what's new in a Python release"}


def doc_sentences(folder: Path) -> list[str]:
    """Prose sentences of the reST sources in `folder`: directives, code, tables and markup-heavy lines left out."""
    out = []
    for path in sorted(folder.rglob("*.rst.txt")):
        for para in path.read_text(encoding="utf-8").split("\n\n"):
            lines = [ln.strip() for ln in para.splitlines()]
            if not lines or any(ln.startswith(("..", ":", ">>>", "=", "-", "*", "+", "|")) for ln in lines[:1]):
                continue
            text = re.sub(r":[a-z:]+:`~?([^`<]*?)(?: <[^>]*>)?`", r"\1", " ".join(lines)).replace("``", "")
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                if 50 <= len(sentence) <= 220 and sentence[0].isupper() and "`" not in sentence:
                    out.append(sentence)
    return out


def run_classify(args: argparse.Namespace) -> None:
    from lmforge.embeddings import embed

    rng = random.Random(0)
    train_rows, test_rows = [], []
    for label in LABELS:
        sentences = sorted(set(doc_sentences(DOCS / label)))
        rng.shuffle(sentences)
        train_rows += [{"text": t, "label": label} for t in sentences[:150]]
        test_rows += [{"text": t, "label": label} for t in sentences[150:190]]
    out = ROOT / "finetune-classify"
    data, test = write_jsonl(out / "train.jsonl", train_rows), write_jsonl(out / "test.jsonl", test_rows)
    # zero-shot baseline: the nearest label description by sentence embedding
    names = list(LABELS)
    label_vecs = embed([f"A sentence from {d}." for d in LABELS.values()])
    vecs = embed([r["text"] for r in test_rows])
    nearest = (vecs @ label_vecs.T).argmax(-1)
    baseline = sum(names[int(i)] == r["label"] for i, r in zip(nearest, test_rows, strict=True)) / len(test_rows)
    start = time.time()
    opts = FinetuneOptions(model="minilm-l6", data=data, task="classify", out=out / "run", method="full",
                           val_data=test, max_len=96, epochs=args.epochs)
    tc = TrainConfig(steps=0, batch_size=16, lr=args.lr, min_lr=args.lr / 10, warmup=20, eval_every=0,
                     save_every=100)
    result = finetune(opts, tc, progress=True)
    print(format_result(result))
    print(f"\n{len(test_rows)} held-out sentences, {len(LABELS)} labels, training took "
          f"{(time.time() - start) / 60:.1f} min")
    print(f"accuracy: nearest-label zero-shot {baseline:.1%}, fine-tuned {result['after']['accuracy']:.1%} "
          f"(chance {1 / len(LABELS):.1%})")


def run_domain(args: argparse.Namespace) -> None:
    files = sorted((DOCS / "library").glob("*.rst.txt"))
    rng = random.Random(0)
    rng.shuffle(files)
    out = ROOT / "finetune-domain"
    train_dir, val_dir = out / "train", out / "val"
    for folder, chosen in ((train_dir, files[:60]), (val_dir, files[60:68])):
        folder.mkdir(parents=True, exist_ok=True)
        for f in chosen:
            (folder / f.name.replace(".rst.txt", ".txt")).write_text(f.read_text(encoding="utf-8"))
    start = time.time()
    opts = FinetuneOptions(model="smollm2-135m-instruct", data=train_dir, task="domain", out=out / "run",
                           val_data=val_dir, max_len=128, rank=16, alpha=32)
    tc = TrainConfig(steps=args.steps, batch_size=8, lr=args.lr, min_lr=args.lr / 10, warmup=10, eval_every=0,
                     save_every=50)
    result = finetune(opts, tc, progress=True)
    print(format_result(result))
    print(f"\nheld-out: {len(list(val_dir.iterdir()))} library pages never trained on; training took "
          f"{(time.time() - start) / 60:.1f} min")
    print(f"perplexity: before {result['before']['perplexity']:.2f}, after {result['after']['perplexity']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=["format", "classify", "domain"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-3 (LoRA) / 2e-4 (classify, full)")
    ap.add_argument("--epochs", type=float, default=5.0, help="classify")
    args = ap.parse_args()
    if args.lr is None:
        args.lr = 2e-4 if args.task == "classify" else 1e-3
    {"format": run_format, "classify": run_classify, "domain": run_domain}[args.task](args)


if __name__ == "__main__":
    main()
