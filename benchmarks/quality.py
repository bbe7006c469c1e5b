"""What each precision costs in answers, on the shipped SmolLM2-135M-Instruct GGUF: perplexity on a fixed text
and greedy agreement with fp32 on a set of chat prompts, for float32 / bfloat16 / int8 / int4 (and llama.cpp's
llama-server on the same file, when benchmarks/llamacpp.py has built it).

Perplexity: the first 4,096 tokens of the GPL-3 text Debian ships (/usr/share/common-licenses/GPL-3), window
512, stride 256. Agreement: 24 questions through the chat template, 32 greedy tokens each; "same" counts answers
identical to fp32's, "tokens" the share of fp32's tokens matched before the first difference.

    .venv/bin/python benchmarks/quality.py [--dtypes float32,bfloat16,int8,int4] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lmforge.engine import Engine
from lmforge.eval.perplexity import perplexity
from lmforge.generate import encode_prompt
from lmforge.sampling import SamplingParams
from lmforge.weights.load import load
from lmforge.weights.registry import resolve

sys.path.insert(0, str(Path(__file__).parent))
MODEL = "smollm2-135m-instruct"
TEXT = Path("/usr/share/common-licenses/GPL-3")
QUESTIONS = [
    "What is the capital of France?", "What is the capital of Japan?", "How many legs does a spider have?",
    "What is 12 times 12?", "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?",
    "Name the largest planet in the solar system.", "What gas do plants take in from the air?",
    "Translate 'thank you' into Spanish.", "What is the chemical symbol for gold?",
    "Give me a synonym for 'happy'.", "What is the opposite of 'cold'?", "How many days are in a leap year?",
    "What language is spoken in Brazil?", "Write a haiku about the sea.", "What is photosynthesis?",
    "Explain what a computer virus is in one sentence.", "List three primary colors.",
    "What is the square root of 81?", "Who painted the Mona Lisa?", "What is the freezing point of water in "
    "Fahrenheit?", "Suggest a name for a pet cat.", "What does a thermometer measure?",
    "Why is the sky blue?",
]
NEW_TOKENS = 32


def greedy_answers(model, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    engine = Engine(model, tokenizer, max_batch=len(prompts))
    ids = [engine.add(p, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0)) for p in prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for o in engine.step():
            if o.token is not None:
                out[o.request_id].append(o.token)
    return [out[i] for i in ids]


def llama_server_answers(prompts: list[list[int]]) -> list[list[int]] | None:
    try:
        import llamacpp  # benchmarks/llamacpp.py
    except ImportError:
        return None
    if llamacpp.find_binary("llama-server") is None:
        return None
    answers = []
    with llamacpp.server(resolve(MODEL), port=8931, parallel=1, ctx=2048) as base:
        for p in prompts:
            body = json.dumps({"prompt": p, "n_predict": NEW_TOKENS, "temperature": 0, "cache_prompt": False,
                               "return_tokens": True}).encode()
            req = urllib.request.Request(f"{base}/completion", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                answers.append(list(json.loads(r.read())["tokens"]))
    return answers


def agreement(answers: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    same = sum(a == r for a, r in zip(answers, reference, strict=True)) / len(reference)
    matched = total = 0
    for a, r in zip(answers, reference, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, r, strict=False)) if x != y), min(len(a), len(r)))
        matched, total = matched + n, total + len(r)
    return same, matched / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16,int8,int4")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    console = Console(width=120)
    dtypes = args.dtypes.split(",")
    if dtypes[0] != "float32":
        dtypes.insert(0, "float32")
    table = Table(title=f"SmolLM2-135M-Instruct (Q4_1 GGUF) on {torch.get_num_threads()} threads",
                  caption="same / tokens: greedy answers identical to fp32's / fp32 tokens matched before a difference")
    for col in ("engine", "dtype", "perplexity", "vs fp32", "same", "tokens", "France?", "seconds"):
        table.add_column(col, justify="left" if col in ("engine", "dtype", "France?") else "right")
    reference: list[list[int]] = []
    base_ppl = 0.0
    tokenizer = None
    for dtype in dtypes:
        start = time.perf_counter()
        model, tokenizer = load(MODEL, dtype=dtype)
        text_ids = tokenizer.encode(TEXT.read_text())[: args.tokens]
        ppl = perplexity(model, text_ids, window=512, stride=256).perplexity
        prompts = [encode_prompt(tokenizer, q, chat=True) for q in QUESTIONS]
        answers = greedy_answers(model, tokenizer, prompts)
        if dtype == "float32":
            reference, base_ppl = answers, ppl
        same, tokens = agreement(answers, reference)
        france = tokenizer.decode(answers[0]).strip().splitlines()[0][:40]
        table.add_row("lmforge", dtype, f"{ppl:.3f}", f"{ppl / base_ppl - 1:+.2%}", f"{same:.0%}", f"{tokens:.0%}",
                      france, f"{time.perf_counter() - start:.0f}")
        del model
    assert tokenizer is not None
    llama = llama_server_answers([encode_prompt(tokenizer, q, chat=True) for q in QUESTIONS])
    if llama is None:
        console.print("llama.cpp row skipped: build it with `.venv/bin/python benchmarks/llamacpp.py --build`")
    else:
        same, tokens = agreement(llama, reference)
        france = tokenizer.decode(llama[0]).strip().splitlines()[0][:40]
        table.add_row("llama.cpp llama-server", "Q4_1", "-", "", f"{same:.0%}", f"{tokens:.0%}", france, "")
    console.print(table)


if __name__ == "__main__":
    main()
