"""The data of alignment: preference pairs, ratings (the chat page's thumbs) and prompts, validated row by row,
and rendered to tokens exactly as fine-tuning renders a dialog.

Row shapes (JSONL; other fields are ignored):
- pair:    {"prompt" | "messages", "chosen", "rejected"}
- rating:  {"prompt" | "messages", "response", "rating": -1 | 1}   (what `lmforge serve --feedback` writes)
- prompt:  {"prompt" | "messages"}
"prompt" is one user turn; "messages" is the conversation before the answer (it ends with a user turn; a system
message may open it). A bad row is an LmforgeError "FILE line N: ...".

Rendering: the conversation plus the answer as an assistant turn goes through data/sft.py's pieces, so the prompt
is the text `lmforge generate --chat` would feed the model (same template, same default system prompt) and the
answer is the assistant turn's content up to and including its end-of-turn token. Only that last answer is
trained: earlier assistant turns of a conversation are context.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.data.collate import Batch, pad_batch
from lmforge.data.sft import SFTData, _dialog_pieces, _instruct_pieces, _text, message_list, read_jsonl
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

Messages = list[dict[str, str]]


@dataclass
class PairRow:
    line: int
    messages: Messages  # the conversation before the answer
    chosen: str
    rejected: str


@dataclass
class RatingRow:
    line: int
    messages: Messages
    response: str
    rating: int  # 1 liked, -1 disliked


@dataclass
class PromptRow:
    line: int
    messages: Messages
    source: str = ""  # the file it came from, for messages that name the row

    @property
    def where(self) -> str:
        return f"{self.source} line {self.line}" if self.source else f"line {self.line}"

    @property
    def prompt(self) -> str:
        """The last user turn: what a rule-based reward function is given as the prompt."""
        return self.messages[-1]["content"]


@dataclass
class PairTokens:
    """One pair as token ids: the shared prompt and each answer (its end-of-turn token included)."""

    line: int
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float = 0.0  # the reference model's summed log-prob of each answer (DPO fills them in)
    ref_rejected: float = 0.0

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


# ---- reading ------------------------------------------------------------------------------------------------


def conversation(row: dict[str, Any], where: str) -> Messages:
    """The conversation before the answer: {"prompt": str} as one user turn, or "messages" ending in a user turn."""
    if "messages" not in row or row["messages"] is None:
        if "prompt" not in row:
            raise LmforgeError(f"{where}: missing field 'prompt' (or 'messages')")
        return [{"role": "user", "content": _text(row, "prompt", where)}]
    out = message_list(row["messages"], where)
    if out[-1]["role"] != "user":
        raise LmforgeError(f"{where}: 'messages' must end with a user turn (the answer follows it), not "
                           f"{out[-1]['role']!r}")
    if not out[-1]["content"].strip():
        raise LmforgeError(f"{where}: the last user message is empty")
    return out


def read_pairs(path: str | Path) -> list[PairRow]:
    path = Path(path)
    rows = []
    for n, row in read_jsonl(path):
        where = f"{path} line {n}"
        messages = conversation(row, where)
        chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
        if chosen.strip() == rejected.strip():
            raise LmforgeError(f"{where}: 'chosen' and 'rejected' are the same answer (nothing to prefer)")
        rows.append(PairRow(n, messages, chosen, rejected))
    if not rows:
        raise LmforgeError(f"{path}: no rows (the dataset is empty)")
    return rows


def read_ratings(path: str | Path) -> list[RatingRow]:
    path = Path(path)
    rows = []
    for n, row in read_jsonl(path):
        where = f"{path} line {n}"
        messages = conversation(row, where)
        response = _text(row, "response", where)
        rating = row.get("rating")
        if isinstance(rating, bool) or rating not in (-1, 1):
            raise LmforgeError(f"{where}: 'rating' must be -1 or 1, not {json.dumps(rating)[:40]}")
        rows.append(RatingRow(n, messages, response, int(rating)))
    return rows


def read_prompts(path: str | Path) -> list[PromptRow]:
    path = Path(path)
    rows = [PromptRow(n, conversation(row, f"{path} line {n}"), str(path)) for n, row in read_jsonl(path)]
    if not rows:
        raise LmforgeError(f"{path}: no rows (the file is empty)")
    return rows


# ---- ratings -> pairs ---------------------------------------------------------------------------------------


def pairs_from_ratings(ratings: list[RatingRow]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pair a liked and a disliked answer to the same conversation (the chat page's regenerate gives the second
    answer). Each conversation pairs its answers in file order, liked i with disliked i; leftovers are counted.
    Returns (pair rows in the pair-file shape, counts)."""
    groups: dict[str, tuple[Messages, dict[str, str], dict[str, str]]] = {}
    for r in ratings:
        key = json.dumps(r.messages, sort_keys=True, ensure_ascii=False)
        messages, liked, disliked = groups.setdefault(key, (r.messages, {}, {}))
        # answers that differ only in surrounding space are one answer (as read_pairs compares them)
        (liked if r.rating > 0 else disliked).setdefault(r.response.strip(), r.response)
    pairs, unpaired = [], 0
    for messages, liked_by, disliked_by in groups.values():
        torn = liked_by.keys() & disliked_by.keys()  # rated both ways: no preference to learn from it
        liked = [v for k, v in liked_by.items() if k not in torn]
        disliked = [v for k, v in disliked_by.items() if k not in torn]
        unpaired += 2 * len(torn)
        n = min(len(liked), len(disliked))
        unpaired += len(liked) + len(disliked) - 2 * n
        for chosen, rejected in zip(liked[:n], disliked[:n], strict=True):
            row: dict[str, Any] = ({"prompt": messages[0]["content"]} if len(messages) == 1 else
                                   {"messages": messages})
            pairs.append({**row, "chosen": chosen, "rejected": rejected})
    return pairs, {"ratings": len(ratings), "conversations": len(groups), "pairs": len(pairs), "unpaired": unpaired}


def export_feedback(source: str | Path, out: str | Path) -> dict[str, int]:
    """`lmforge feedback export`: a ratings JSONL (the chat page's feedback file) -> a pairs JSONL, written to a
    temporary name and renamed (a kill leaves no half file)."""
    pairs, counts = pairs_from_ratings(read_ratings(source))
    if not pairs:
        raise LmforgeError(f"{source}: no conversation has both a liked and a disliked answer ({counts['ratings']} "
                           "ratings): regenerate an answer on the chat page and rate both")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    os.replace(tmp, out)
    return counts


# ---- rendering ----------------------------------------------------------------------------------------------


def render(tokenizer: Tokenizer, messages: Messages, answer: str, where: str, allow_empty: bool = False
           ) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the conversation as generation sees it and the answer's assistant turn. One user
    turn goes through the instruct rendering (plain Alpaca text when the tokenizer has no chat template).
    `allow_empty`: an empty answer is an empty turn (a reward model scores a policy that said nothing) rather
    than an error (a training pair)."""
    if not answer.strip() and not allow_empty:
        raise LmforgeError(f"{where}: empty answer")
    if len(messages) == 1 or (len(messages) == 2 and messages[0]["role"] == "system"):
        system = messages[0]["content"] if len(messages) == 2 else None
        chat = bool(tokenizer.chat_template)
        if not chat and system is not None:
            raise LmforgeError(f"{where}: a system message needs a tokenizer with a chat template")
        pieces = _instruct_pieces(tokenizer, messages[-1]["content"], "", answer, chat, system, where)
    else:
        if not tokenizer.chat_template:
            raise LmforgeError(f"{where}: a conversation needs a tokenizer with a chat template")
        pieces = _dialog_pieces(tokenizer, [*messages, {"role": "assistant", "content": answer}], where)
    return [i for p in pieces[:-1] for i in p.ids], pieces[-1].ids


def pair_tokens(rows: list[PairRow], tokenizer: Tokenizer, max_len: int, source: str | Path = "") -> list[PairTokens]:
    """Every pair rendered; a pair whose longer side does not fit max_len tokens is an error naming its row."""
    out = []
    for r in rows:
        where = f"{source} line {r.line}" if source else f"line {r.line}"
        prompt, chosen = render(tokenizer, r.messages, r.chosen, where)
        prompt_r, rejected = render(tokenizer, r.messages, r.rejected, where)
        assert prompt_r == prompt, "one conversation renders to one prompt"
        longest = len(prompt) + max(len(chosen), len(rejected))
        if longest > max_len:
            raise LmforgeError(f"{where}: the pair is {longest} tokens long, more than the {max_len} allowed "
                               "(the model's context or --max-len): shorten it or raise --max-len")
        out.append(PairTokens(r.line, prompt, chosen, rejected))
    return out


# ---- batches ------------------------------------------------------------------------------------------------

SIDES = ("chosen", "rejected")


def collate_pairs(pairs: Sequence[PairTokens], pad_id: int) -> Batch:
    """Pairs -> one batch whose first dimension is the pair (so the loop's micro-batches and ranks keep both sides
    of a pair together). Per side: `{side}_tokens` (B, T) the whole row (prompt + answer), right-padded;
    `{side}_answer` (B, T) 1 on the answer's tokens; `{side}_mask` (B, T) attention; `ref_{side}` (B,).
    `labels` (B,) holds one target per pair (0): the loop divides the summed loss by the number of pairs."""
    batch: Batch = {"labels": torch.zeros(len(pairs), dtype=torch.long)}
    for side in SIDES:
        answers = [getattr(p, side) for p in pairs]
        tokens, mask = pad_batch([p.prompt + a for p, a in zip(pairs, answers, strict=True)], pad_id)
        answer, _ = pad_batch([[0] * len(p.prompt) + [1] * len(a) for p, a in zip(pairs, answers, strict=True)], 0)
        batch[f"{side}_tokens"], batch[f"{side}_mask"], batch[f"{side}_answer"] = tokens, mask, answer
        batch[f"ref_{side}"] = torch.tensor([getattr(p, f"ref_{side}") for p in pairs], dtype=torch.float64)
    return batch


class PairData(SFTData):
    """Preference pairs for the training loop: SFTData's step-deterministic, length-grouped order, pair batches."""

    def check_rows(self, rows: Sequence[Any]) -> str:
        return "pairs"

    def row_length(self, row: Any) -> int:
        return 2 * row.length  # both sides run through the model

    def collate(self, rows: Sequence[Any]) -> Batch:
        return collate_pairs(rows, self.pad_id)
