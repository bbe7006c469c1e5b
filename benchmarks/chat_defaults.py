"""Chat sampling defaults for the default model, measured on simple questions with known short answers.

Each question goes through the chat template (one user turn, the template's own system prompt), once per
seed, under every candidate setting (temperature, top_p, repetition penalty); one batched `generate` call
per setting and seed holds all questions. Greedy (temperature 0) ignores the seed and runs once.

An answer is judged with simple, documented rules (words = lower-cased runs of letters/digits/apostrophes):

- derailed, if any of:
  loop     some 8-gram of words occurs 3 or more times;
  foreign  it has >= 6 words and either under 15% of them are common English words or over 30% of them
           hold non-ASCII letters (the reported failure: "L'Étoile, la femme au roi, ...");
  limit    (factual questions only) it used up --max-new-tokens without an end of turn: its text
           re-tokenizes to >= 95% of the limit (the text is all `generate` returns, and re-tokenizing can
           merge a few tokens). A story may rightly be long, so open requests that reach the limit are
           counted in the "limit" column but not as derailed.
- correct: a factual answer that is not derailed and contains the expected keyword (any of a few spellings,
  case-insensitive, whole words). "keyword" counts the keyword alone, derailed or not.
  Open requests (haiku, story, tips) are judged only for derailing.

The recommended setting has the highest correct rate, then the lowest derail rate, then the highest
temperature (more varied answers) among ties. The longest answer that was not derailed (correct, for
factual questions) suggests a max_new_tokens for chat.

    .venv/bin/python benchmarks/chat_defaults.py [--seeds 4] [--max-new-tokens 200]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmforge.generate import SamplingParams, encode_prompt, generate
from lmforge.weights.load import load

MODEL = "smollm2-135m-instruct"

# question -> accepted keywords (whole words, case-insensitive); None = open request, judged for derailing only
QUESTIONS: dict[str, tuple[str, ...] | None] = {
    "What is the capital of France?": ("paris",),
    "What is 2+2?": ("4", "four"),
    "What colour is the sky on a clear day?": ("blue",),
    "What is the largest planet in our solar system?": ("jupiter",),
    "Who wrote Romeo and Juliet?": ("shakespeare",),
    "What is the boiling point of water in degrees Celsius?": ("100",),
    "How many days are there in a week?": ("7", "seven"),
    "What is the capital of Japan?": ("tokyo",),
    "Which planet is known as the Red Planet?": ("mars",),
    "How many legs does a spider have?": ("8", "eight"),
    "What is the opposite of hot?": ("cold",),
    "What is the chemical symbol for gold?": ("au",),
    "Write a haiku about the sea.": None,
    "Tell me a short story about a cat.": None,
    "Give me three tips for staying healthy.": None,
}

# (temperature, top_p, repetition_penalty); the current CLI default is 0.3 / 0.9 / 1.0
# (0.2, 0.5): the nucleus keeps one token wherever the model is >= 50% sure, so it samples only where it is unsure.
SETTINGS: list[tuple[float, float, float]] = [
    (0.0, 1.0, 1.0),
    (0.2, 0.9, 1.0),
    (0.3, 0.9, 1.0),
    (0.2, 0.5, 1.0),
    (0.3, 0.9, 1.05),
    (0.3, 0.9, 1.1),
    (0.5, 0.9, 1.1),
]

COMMON_ENGLISH = {
    "the", "a", "an", "of", "to", "in", "and", "is", "are", "was", "were", "be", "been", "it", "its", "this", "that",
    "these", "those", "for", "on", "with", "as", "at", "by", "from", "or", "not", "no", "but", "if", "so", "than",
    "then", "there", "their", "they", "them", "he", "she", "his", "her", "we", "our", "you", "your", "i", "me", "my",
    "what", "which", "who", "how", "when", "where", "why", "can", "could", "will", "would", "should", "may", "might",
    "do", "does", "did", "has", "have", "had", "one", "two", "three", "all", "some", "many", "more", "most", "other",
    "also", "about", "into", "over", "after", "before", "up", "out", "very", "just", "only", "each", "such", "like",
}
WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


@dataclass
class Verdict:
    tokens: int
    loop: bool
    limit: bool
    foreign: bool
    keyword: bool | None  # None for open requests

    @property
    def derailed(self) -> bool:
        return self.loop or self.foreign or (self.limit and self.keyword is not None)

    @property
    def correct(self) -> bool | None:
        return None if self.keyword is None else self.keyword and not self.derailed


def has_loop(words: list[str], n: int = 8, times: int = 3) -> bool:
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return True
    return False


def is_foreign(words: list[str]) -> bool:
    if len(words) < 6:
        return False
    english = sum(w in COMMON_ENGLISH for w in words) / len(words)
    accented = sum(not w.isascii() for w in words) / len(words)
    return english < 0.15 or accented > 0.30


def judge(text: str, n_tokens: int, max_new_tokens: int, keywords: tuple[str, ...] | None) -> Verdict:
    words = WORD.findall(text.lower())
    keyword = None if keywords is None else any(k in words for k in keywords)
    return Verdict(n_tokens, has_loop(words), n_tokens >= 0.95 * max_new_tokens, is_foreign(words), keyword)


def label(setting: tuple[float, float, float]) -> str:
    t, p, r = setting
    return f"greedy, rep {r:g}" if t == 0 else f"{t:g} / {p:g} / {r:g}"


def pct(part: int, whole: int) -> str:
    return f"{part}/{whole} {100 * part / whole:.0f}%" if whole else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="sampled runs per question and setting")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--show", type=int, default=3, help="derailed answers to print per setting")
    parser.add_argument("--dump", default=None, help="write every answer and its verdict to this JSON file")
    args = parser.parse_args()

    console = Console() if sys.stdout.isatty() else Console(width=160)  # a log file gets the whole table
    model, tokenizer = load(MODEL)
    questions = list(QUESTIONS)
    prompts = [encode_prompt(tokenizer, q, chat=True) for q in questions]
    rows, answers = [], []
    start = time.perf_counter()
    for setting in SETTINGS:
        temperature, top_p, penalty = setting
        seeds = [0] if temperature == 0 else list(range(args.seeds))
        t0 = time.perf_counter()
        verdicts: list[tuple[str, str, Verdict]] = []
        for seed in seeds:
            params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=top_p,
                                    repetition_penalty=penalty, seed=seed)
            for q, text in zip(questions, generate(model, tokenizer, prompts, params), strict=True):
                n = len(tokenizer.encode(text, add_special_tokens=False))
                verdicts.append((q, text, judge(text, n, args.max_new_tokens, QUESTIONS[q])))
                answers.append({"setting": label(setting), "seed": seed, "question": q, "answer": text,
                                **asdict(verdicts[-1][2]), "derailed": verdicts[-1][2].derailed})
        elapsed = time.perf_counter() - t0
        facts = [v for _, _, v in verdicts if v.keyword is not None]
        opens = [v for _, _, v in verdicts if v.keyword is None]
        good_fact = [v.tokens for v in facts if v.correct]
        good_open = [v.tokens for v in opens if not v.derailed]
        rows.append({
            "setting": setting,
            "correct": sum(bool(v.correct) for v in facts),
            "keyword": sum(bool(v.keyword) for v in facts),
            "facts": len(facts),
            "derailed": sum(v.derailed for _, _, v in verdicts),
            "all": len(verdicts),
            "open_derailed": sum(v.derailed for v in opens),
            "opens": len(opens),
            "loop": sum(v.loop for _, _, v in verdicts),
            "limit": sum(v.limit for _, _, v in verdicts),
            "foreign": sum(v.foreign for _, _, v in verdicts),
            "mean_tokens": statistics.mean(v.tokens for _, _, v in verdicts),
            "max_fact": max(good_fact, default=0),
            "max_open": max(good_open, default=0),
            "seconds": elapsed,
            "verdicts": verdicts,
        })
        console.print(f"[dim]{label(setting)}: {len(seeds)} seed(s), {elapsed:.0f} s[/dim]")
        for q, text, v in [x for x in verdicts if x[2].derailed][: args.show]:
            why = ",".join(k for k in ("loop", "limit", "foreign") if getattr(v, k))
            console.print(f"[dim]  derailed ({why}, {v.tokens} tok) {q!r} -> {text[:100]!r}[/dim]", highlight=False)

    n_facts = sum(k is not None for k in QUESTIONS.values())
    table = Table(title=f"{MODEL} chat answers: {n_facts} factual + {len(questions) - n_facts} open questions, "
                  f"{args.seeds} seeds (greedy: 1), max_new_tokens {args.max_new_tokens}")
    for col in ("temperature / top_p / rep. penalty", "correct", "keyword", "derailed (all)", "derailed (open)",
                "loop", "limit", "foreign", "mean tok", "longest correct", "longest open ok", "time"):
        table.add_column(col, justify="left" if col.startswith("temp") else "right")
    for r in rows:
        table.add_row(
            label(r["setting"]), pct(r["correct"], r["facts"]), pct(r["keyword"], r["facts"]),
            pct(r["derailed"], r["all"]), pct(r["open_derailed"], r["opens"]), str(r["loop"]), str(r["limit"]),
            str(r["foreign"]), f"{r['mean_tokens']:.0f}", str(r["max_fact"]), str(r["max_open"]),
            f"{r['seconds']:.0f} s",
        )
    console.print(table)

    per_q = Table(title="correct (factual) or not derailed (open) answers per question")
    per_q.add_column("question", no_wrap=True)
    for r in rows:
        per_q.add_column(label(r["setting"]), justify="right")
    for q in questions:
        cells = []
        for r in rows:
            mine = [v for question, _, v in r["verdicts"] if question == q]
            ok = sum(bool(v.correct) if v.keyword is not None else not v.derailed for v in mine)
            cells.append(f"{ok}/{len(mine)}")
        per_q.add_row(q, *cells)
    console.print(per_q)
    if args.dump:
        Path(args.dump).write_text(json.dumps(answers, indent=1, ensure_ascii=False))

    best = max(rows, key=lambda r: (Fraction(r["correct"], r["facts"]), -Fraction(r["derailed"], r["all"]),
                                    r["setting"][0]))
    t, p, rp = best["setting"]
    console.print(f"recommended: temperature {t:g}, top_p {p:g}, repetition_penalty {rp:g} "
                  f"(correct {pct(best['correct'], best['facts'])}, derailed {pct(best['derailed'], best['all'])})")
    open_at_limit = sum(v.limit and not v.derailed for r in rows for _, _, v in r["verdicts"] if v.keyword is None)
    console.print(f"longest correct factual answer: {best['max_fact']} tokens with the recommended setting, "
                  f"{max(r['max_fact'] for r in rows)} over all settings; longest non-derailed open answer "
                  f"{max(r['max_open'] for r in rows)} tokens, and {open_at_limit} open answers (no loop) were cut at "
                  f"max_new_tokens {args.max_new_tokens}")
    console.print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
