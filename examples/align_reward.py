"""A rule-based reward for the alignment study (examples/align_real.py): short answers that hold the key fact.

    lmforge align ppo ... --reward examples.align_reward:short_and_correct   # run from the repository root

short_and_correct(prompt, response): +1 when the response (lowercased) contains one of the question's key facts
from examples/align/questions.jsonl (where a word starts: has_key), minus 0.02 per word beyond 8, clipped to
[-1, 1]. The prompt may be the bare question or any text containing it (a chat-rendered prompt, say): the longest
known question inside it is used.
A prompt with no known question gets only the length penalty.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

QUESTIONS = Path(__file__).resolve().parent / "align" / "questions.jsonl"
FREE_WORDS = 8
PER_WORD = 0.02


@functools.cache
def _keys() -> dict[str, tuple[str, ...]]:
    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["prompt"]: tuple(k.lower() for k in r["key"]) for r in rows}


@functools.cache
def keys_for(prompt: str) -> tuple[str, ...]:
    """The key facts of the question `prompt` is, or contains (the longest such question); () if none."""
    table = _keys()
    if prompt in table:
        return table[prompt]
    inside = [q for q in table if q in prompt]
    return table[max(inside, key=len)] if inside else ()


@functools.cache
def _pattern(key: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(key) + (r"(?!\d)" if key[-1:].isdigit() else ""))


def has_key(response: str, keys: tuple[str, ...] | list[str]) -> bool:
    """Does the lowercased response contain a key where a word starts (and, for a number, where it ends)?
    So "red" is not found in "covered", "12" not in "112" or "120", but "lung" is in "lungs"."""
    text = response.lower()
    return any(_pattern(k).search(text) for k in keys)


def has_key_substring(response: str, keys: tuple[str, ...] | list[str]) -> bool:
    """The plain test: a key anywhere in the lowercased response."""
    text = response.lower()
    return any(k in text for k in keys)


def reward(response: str, keys: tuple[str, ...] | list[str]) -> float:
    words = len(response.split())
    value = (1.0 if has_key(response, keys) else 0.0) - PER_WORD * max(0, words - FREE_WORDS)
    return max(-1.0, min(1.0, value))


def short_and_correct(prompt: str, response: str) -> float:
    return reward(response, keys_for(prompt))
