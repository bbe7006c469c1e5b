"""The evaluation harness behind `lmforge eval`: a JSONL file of rows, one model, one score with a bootstrap
interval, and per-example records that a later run resumes from.

Kinds
- generate: answers come from the engine (lmforge.generate.complete) through the chat template when the model
  has one, exactly as `lmforge generate --chat` would make them, or from a remote server's chat endpoint; each
  is scored against the target by exact / contains / f1 / regex.
- choice: each option is scored by log p(option | prompt) from the model's logits, summed (acc) and divided by
  the option's token count (acc_norm; lm-eval's acc_norm divides by bytes instead). The prediction is the
  best-scored option; ties go to the first.
- classify: choice with one option list for every row (`labels`), unless a row brings its own.
- perplexity: the token-level perplexity of a whole text file (eval/perplexity.py).

Prompts (PromptSpec, lmforge.prompts): with a template or shots, each row's prompt is built by `build_prompt`
from the row's variables (`input`; Alpaca rows also `instruction`) and `shots` examples picked from a pool for
that row. generate sends the built ids to the engine as they are (the chat template, when the model has one, is
applied once, by build_prompt); choice/classify score the options after the built plain text (no chat template,
as above). Shots that do not fit the context are dropped, with a warning naming the row. With `samples` > 1,
generate samples that many answers per row and scores their majority vote (self-consistency).

The continuation convention follows lm-eval: the option is scored as the continuation of the row's plain prompt
text (no chat template) after one space, `prompt + " " + option`, unless the option already starts with
whitespace or the prompt ends with it; whitespace at the end of the prompt moves onto the option, so the option's
first token is the same one BPE gives a word after a space. Its tokens are those of `encode(prompt + option)`
after the prompt's own tokens.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import perplexity
from lmforge.generate import complete, encode_prompt
from lmforge.prompts import (
    SELECTIONS,
    Pool,
    PromptTemplate,
    build_prompt,
    load_template,
    majority_vote,
    read_pool,
    select_shots,
)
from lmforge.prompts import normalize_answer as vote_key
from lmforge.sampling import SamplingParams
from lmforge.textio import jsonl_rows
from lmforge.weights.registry import DEFAULT_EMBED_MODEL

if TYPE_CHECKING:
    from lmforge.client import Client
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

Kind = Literal["generate", "choice", "classify", "perplexity"]
KINDS: tuple[str, ...] = ("generate", "choice", "classify", "perplexity")
ROW_SHAPES = '"input"/"target", "instruction"/"output" (Alpaca) or "prompt"/"completion"'


def default_params() -> SamplingParams:
    """Greedy: a score should not depend on the draw."""
    return SamplingParams(max_new_tokens=128, temperature=0.0)


# ---- rows ---------------------------------------------------------------------------------------------------


@dataclass
class Example:
    index: int  # position among the file's rows: what a resumed run matches records by
    where: str  # "FILE line N", for messages
    prompt: str
    target: str | int  # generate: the answer text; choice/classify: the index of the right option
    options: list[str] | None = None
    variables: dict[str, str] = field(default_factory=dict)  # a template's variables: input (+ instruction)
    ids: list[int] | None = None  # generate with a PromptSpec: the built prompt's tokens, sent as they are
    shots: list[dict[str, Any]] | None = None  # with a PromptSpec: the shots in the prompt (pool line, input)


def _text_and_target(row: dict[str, Any], where: str) -> tuple[str, Any]:
    """(prompt, target) of a row in any of the three shapes."""
    if "instruction" in row:  # Alpaca: the input, when there is one, follows the instruction
        fields: tuple[str, ...] = ("instruction", "output")
    elif "prompt" in row or "completion" in row:
        fields = ("prompt", "completion")
    else:
        fields = ("input", "target")
    missing = [f'"{f}"' for f in fields if f not in row]
    if missing:
        raise LmforgeError(f"{where}: missing {' and '.join(missing)} (rows need {ROW_SHAPES})")
    text, extra = row[fields[0]], (row.get("input") or "") if fields[0] == "instruction" else ""
    if not isinstance(text, str) or not isinstance(extra, str):
        raise LmforgeError(f'{where}: "{fields[0]}" must be a string')
    return text + (f"\n\n{extra}" if extra else ""), row[fields[1]]


def _target_index(target: Any, options: list[str], where: str) -> int:
    if isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < len(options):
            raise LmforgeError(f"{where}: target index {target} is outside its {len(options)} options")
        return target
    if isinstance(target, str) and target in options:
        return options.index(target)
    raise LmforgeError(f"{where}: the target must be one of the options (its text or its index), got {target!r:.60}")


def _parse_row(row: Any, index: int, where: str, kind: str, labels: list[str] | None) -> Example:
    if not isinstance(row, dict):
        raise LmforgeError(f"{where}: a row must be a JSON object with {ROW_SHAPES}")
    prompt, target = _text_and_target(row, where)
    variables = ({"instruction": row["instruction"], "input": row.get("input") or ""} if "instruction" in row
                 else {"input": prompt})
    if kind == "generate":
        if isinstance(target, bool) or not isinstance(target, str | int | float):
            raise LmforgeError(f"{where}: the target must be a string, got {type(target).__name__}")
        return Example(index, where, prompt, str(target), variables=variables)
    options = row.get("options")
    if options is None and kind == "classify":
        options = labels
    if options is None:
        hint = "give --labels a,b,c or" if kind == "classify" else "choice rows need"
        raise LmforgeError(f'{where}: no options: {hint} an "options" list in the row')
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise LmforgeError(f'{where}: "options" must be a list of at least two non-empty strings')
    return Example(index, where, prompt, _target_index(target, options, where), list(options), variables)


def read_examples(path: str | Path, kind: str, labels: list[str] | None = None, limit: int | None = None
                  ) -> list[Example]:
    """The rows of a JSONL file (blank lines skipped), the first `limit` of them when given."""
    if kind not in KINDS or kind == "perplexity":
        raise LmforgeError(f"rows are for kinds generate, choice and classify, not {kind!r}")
    examples: list[Example] = []
    for n, row, _ in jsonl_rows(path):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(_parse_row(row, len(examples), f"{path} line {n}", kind, labels))
    if not examples:
        raise LmforgeError(f"{path} holds no rows")
    return examples


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None


def check_options(kind: str, metric: str | None = None, labels: list[str] | None = None, remote: bool = False,
                  out: str | Path | None = None, window: int | None = None, stride: int | None = None,
                  prompts: bool = False, samples: int = 1) -> None:
    """Options that do not fit the kind, refused before anything slow (loading, generating) starts. `prompts`:
    a PromptSpec (template or shots) is given."""
    if kind not in KINDS:
        raise LmforgeError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    if prompts and kind == "perplexity":
        raise LmforgeError("--template and --shots are for --kind generate, choice and classify")
    if prompts and remote:
        raise LmforgeError("--template and --shots build prompts with a local model's tokenizer: not with --api-base")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise LmforgeError(f"--samples must be an integer >= 1, got {samples!r}")
    if samples > 1 and kind != "generate":
        raise LmforgeError("--samples is for --kind generate (a majority vote over sampled answers)")
    if metric is not None and metric not in METRICS:
        raise LmforgeError(f"unknown metric {metric!r} (one of {', '.join(METRICS)})")
    if metric is not None and kind != "generate":
        raise LmforgeError("--metric is for --kind generate (choice and classify report acc and acc_norm)")
    if labels is not None:
        if kind != "classify":
            raise LmforgeError("--labels is for --kind classify (choice rows carry their own options)")
        if len(labels) < 2 or not all(labels):
            raise LmforgeError("--labels needs at least two non-empty labels, comma-separated")
    if remote and kind != "generate":
        raise LmforgeError(f"--kind {kind} needs the model's log-probabilities: a remote model serves --kind generate "
                           "only")
    if kind == "perplexity" and out is not None:
        raise LmforgeError("--out saves per-example records: perplexity scores one text and has none")
    if kind != "perplexity" and (window is not None or stride is not None):
        raise LmforgeError("--window and --stride are for --kind perplexity")


# ---- prompts -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSpec:
    """How each row's prompt is built: a template (None: lmforge.prompts' default) and `shots` examples from
    `pool`, picked per row by `select`. `random` draws row i's shots with seed + i: reproducible, yet rows differ."""

    template: PromptTemplate | str | Path | None = None
    shots: int = 0
    pool: Pool | str | Path | None = None
    select: str = "first"
    seed: int | None = 0  # None: a fresh draw every run
    embed_model: str | Path = DEFAULT_EMBED_MODEL

    def load(self) -> tuple[PromptTemplate, Pool | None]:
        """The template and pool, checked: every mistake here is refused before a model loads."""
        if self.select not in SELECTIONS:
            raise LmforgeError(f"unknown shot selection {self.select!r} (choose from {', '.join(SELECTIONS)})")
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 0:
            raise LmforgeError(f"the number of shots must be an integer >= 0, got {self.shots!r}")
        template = load_template(self.template)
        pool = self.pool if isinstance(self.pool, Pool) or self.pool is None else read_pool(self.pool)
        if self.shots and pool is None:
            raise LmforgeError(f"{self.shots} shots need a pool of examples to draw them from (--pool FILE)")
        if pool is not None and self.shots > len(pool):
            raise LmforgeError(f"asked for {self.shots} shots but the pool {pool.source} holds only {len(pool)} "
                               "examples")
        return template, pool


def _room(ex: Example, tokenizer: Tokenizer, params: SamplingParams | None) -> int:
    """Tokens kept free after the prompt: the answer's (generate) or the longest option's (choice)."""
    if ex.options is None:
        return (params or default_params()).max_new_tokens
    return max(len(tokenizer.encode(" " + o, add_special_tokens=False)) for o in ex.options)


def render_prompts(examples: list[Example], kind: str, spec: PromptSpec, tokenizer: Tokenizer, context: int,
                   params: SamplingParams | None = None) -> list[Example]:
    """The rows with their prompts built by lmforge.prompts.build_prompt: generate through the chat template when
    the tokenizer has one (the ids kept for the engine), choice/classify as plain text. Shots dropped to fit the
    context are warned about once per row, naming it."""
    template, pool = spec.load()
    built = []
    for ex in examples:
        room = _room(ex, tokenizer, params)
        if room >= context:
            raise LmforgeError(f"{ex.where}: {room} tokens for the answer leave no room for a prompt in the model's "
                               f"context of {context} (lower --max-new-tokens)")
        try:
            shots = []
            if spec.shots:
                assert pool is not None
                seed = None if spec.seed is None else (spec.seed + ex.index) % 2**63
                shots = select_shots(pool, ex.prompt, spec.shots, spec.select, seed,  # type: ignore[arg-type]
                                     spec.embed_model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # build_prompt's own warning does not say which row: ours does
                prompt = build_prompt(template, ex.variables or {"input": ex.prompt}, shots, tokenizer,
                                      chat=None if kind == "generate" else False, max_tokens=context - room)
        except LmforgeError as e:
            raise LmforgeError(f"{ex.where}: {e}") from None
        if prompt.dropped:
            warnings.warn(f"{ex.where}: dropped {prompt.dropped} of {len(shots)} shots to fit the prompt in "
                          f"{context - room} tokens", stacklevel=2)
        used = [{"line": s.line, "input": s.input} for s in prompt.shots_used]
        built.append(replace(ex, prompt=prompt.text, ids=prompt.ids if kind == "generate" else None, shots=used))
    return built


# ---- metrics ------------------------------------------------------------------------------------------------


def _strip_punctuation(text: str) -> str:
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]).startswith("P")):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[start:end]


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no punctuation at either end: '  "Paris."\n' -> 'paris'. Lighter than SQuAD's
    (articles and inner punctuation stay), so '3.5' and "don't" survive."""
    return _strip_punctuation(" ".join(text.lower().split()))


def _words(text: str) -> list[str]:
    return [w for w in (_strip_punctuation(w) for w in normalize_answer(text).split()) if w]


def exact(output: str, target: str) -> float:
    return float(normalize_answer(output) == normalize_answer(target))


def contains(output: str, target: str) -> float:
    """The target appears in the output as whole words: '4' is not in '14'."""
    t = normalize_answer(target)
    return float(re.search(rf"(?<!\w){re.escape(t)}(?!\w)", normalize_answer(output)) is not None)


def f1(output: str, target: str) -> float:
    """Token F1 over the words of both (each stripped of punctuation at its ends)."""
    pred, gold = _words(output), _words(target)
    if not pred or not gold:
        return float(pred == gold)
    common = sum(min(pred.count(w), gold.count(w)) for w in set(gold))
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def regex(output: str, target: str) -> float:
    """The target is a regular expression searched in the raw output (add (?i) to ignore case)."""
    return float(re.search(target, output) is not None)


METRICS: dict[str, Callable[[str, str], float]] = {"exact": exact, "contains": contains, "f1": f1, "regex": regex}


# ---- intervals ----------------------------------------------------------------------------------------------


def bootstrap_ci(scores: list[float] | np.ndarray, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the scores with replacement n_resamples times."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise LmforgeError("no scores to take an interval of")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, 10_000_000 // values.size)  # resamples per draw: about 80 MB of indices at a time
    for begin in range(0, n_resamples, step):
        count = min(step, n_resamples - begin)
        means[begin : begin + count] = values[rng.integers(0, values.size, (count, values.size))].mean(1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


# ---- choice scoring -----------------------------------------------------------------------------------------


def split_pair(tokenizer: Tokenizer, prompt: str, option: str) -> tuple[list[int], list[int]]:
    """(prompt ids, option ids) by the module's convention: prompt + " " + option, spaces kept on the option."""
    sep = "" if not prompt or prompt[-1].isspace() or option[:1].isspace() else " "
    stem = prompt.rstrip()
    continuation = prompt[len(stem) :] + sep + option
    context = tokenizer.encode(stem) if stem else []
    if not context:  # nothing to condition on: start from BOS (or EOS), as lm-eval starts from its end-of-text
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise LmforgeError("an empty prompt needs a tokenizer with a BOS or EOS token to start from")
        return [start], tokenizer.encode(continuation, add_special_tokens=False)
    whole = tokenizer.encode(stem + continuation)
    if whole[: len(context)] == context:
        return context, whole[len(context) :]
    return context, tokenizer.encode(continuation, add_special_tokens=False)  # the merge crossed the boundary


GROUP_TOKENS = 4096  # prompt + option tokens (counted unshared) of the rows one score_rows call gets
# A tree runs as one row under a dense (nodes x nodes) mask, so every node pays attention over all nodes (and
# SDPA with a mask runs well below matmul speed here): trees of ~128 nodes measured fastest for short templated
# prompts. A row whose shared prefix is long (a few-shot block) still joins a bigger tree, up to MAX_TREE_NODES:
# starting a new tree would run that prefix again.
TREE_NODES = 128
MAX_TREE_NODES = 1024


@torch.inference_mode()
def score_options(model: Transformer, prompt: list[int], options: list[list[int]]) -> list[float]:
    """Summed log p(option tokens | prompt) for each option of one row (see score_rows)."""
    return score_rows(model, [(prompt, options)])[0]


class PrefixTree:
    """Token sequences merged on their shared prefixes: node i holds token[i] at depth[i] (its position) below
    parent[i] (-1 for a first token). Packed into one row, a node that sees exactly its ancestors and itself
    computes what it would at the end of its own sequence, so every shared prefix runs once."""

    def __init__(self) -> None:
        self.token: list[int] = []
        self.parent: list[int] = []
        self.depth: list[int] = []
        self.children: list[dict[int, int]] = []
        self.roots: dict[int, int] = {}

    def add(self, tokens: list[int], under: int = -1) -> list[int]:
        """Insert `tokens` below node `under` (-1: from the root) -> the node of each token."""
        nodes = []
        for t in tokens:
            below = self.roots if under < 0 else self.children[under]
            node = below.get(t)
            if node is None:
                node = below[t] = len(self.token)
                self.token.append(t)
                self.parent.append(under)
                self.depth.append(self.depth[under] + 1 if under >= 0 else 0)
                self.children.append({})
            nodes.append(node)
            under = node
        return nodes

    def shared(self, tokens: list[int]) -> int:
        """How many leading `tokens` are already in the tree."""
        below, n = self.roots, 0
        for t in tokens:
            node = below.get(t)
            if node is None:
                break
            below, n = self.children[node], n + 1
        return n

    def keep(self, device: torch.device | None = None) -> Tensor:
        """(T, T) bool: node i sees node j iff j is i or one of its ancestors (parents come before children)."""
        T = len(self.token)
        keep = torch.zeros(T, T, dtype=torch.bool)
        for i, parent in enumerate(self.parent):
            if parent >= 0:
                keep[i] = keep[parent]
            keep[i, i] = True
        return keep.to(device)


@torch.inference_mode()
def score_rows(model: Transformer, rows: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
    """Summed log p(option tokens | prompt) for each option of each row, in one forward per prefix tree: the
    prompts (in sorted order) and each option's tokens but its last go into trees of ~TREE_NODES nodes (shared
    prefixes, repeated prompts and options that start alike run once; no padding), and the LM head reads only the
    nodes whose next token is scored."""
    if model.cfg.family != "decoder":
        raise LmforgeError("choice scoring needs a decoder-only model")
    if not rows or not all(prompt and options and all(options) for prompt, options in rows):
        raise LmforgeError("choice scoring needs a prompt and non-empty options")
    for prompt, options in rows:
        P, L = len(prompt), max(map(len, options))
        if P + L - 1 > model.cfg.max_seq_len:  # the option's last token is only a target
            raise LmforgeError(f"prompt ({P} tokens) and option ({L}) do not fit the context of "
                               f"{model.cfg.max_seq_len}")
    scores: list[list[float]] = [[] for _ in rows]
    tree, members, reads = PrefixTree(), [], []

    def flush() -> None:
        for j, row_scores in zip(members, _score_tree(model, tree, reads, [rows[j][1] for j in members]), strict=True):
            scores[j] = row_scores

    for i in sorted(range(len(rows)), key=lambda i: rows[i][0]):  # rows that share a prefix sit together
        prompt, options = rows[i]
        shared = tree.shared(prompt)
        new = len(prompt) - shared + sum(len(o) - 1 for o in options)
        grown = len(tree.token) + new
        if members and grown > TREE_NODES and (grown > MAX_TREE_NODES or 2 * shared < TREE_NODES):
            flush()
            tree, members, reads = PrefixTree(), [], []
        end = tree.add(prompt)[-1]
        reads.append([[end, *tree.add(o[:-1], end)] for o in options])  # the nodes that predict each token
        members.append(i)
    flush()
    return scores


def _score_tree(model: Transformer, tree: PrefixTree, reads: list[list[list[int]]], options: list[list[list[int]]]
                ) -> list[list[float]]:
    """One forward over the packed tree; the LM head only at the nodes whose next token is scored."""
    device = model.tok_emb.weight.device
    tokens = torch.tensor([tree.token], device=device)
    positions = torch.tensor([tree.depth], device=device)
    hidden = model(tokens, positions, head="hidden", keep=tree.keep(device)[None, None])[0]  # (T, d)
    nodes = sorted({n for row in reads for option in row for n in option})
    at = {n: i for i, n in enumerate(nodes)}
    logp = F.log_softmax(model.lm_logits(hidden[nodes]).float(), -1)  # (nodes read, V)
    pairs = [(at[n], t) for row, row_options in zip(reads, options, strict=True)
             for option_nodes, o in zip(row, row_options, strict=True) for n, t in zip(option_nodes, o, strict=True)]
    picked = iter(logp[[i for i, _ in pairs], [t for _, t in pairs]].tolist())  # each option token's log p, in order
    return [[sum(next(picked) for _ in o) for o in row_options] for row_options in options]


def _fit(prompt: list[int], options: list[list[int]], context: int, where: str) -> list[int]:
    """The prompt loses its oldest tokens (as in lm-eval) when prompt + the longest option overflow the context."""
    longest = max(len(o) for o in options)
    room = context + 1 - longest  # the last option token is only a target, never an input
    if room < 1:
        raise LmforgeError(f"{where}: an option of {longest} tokens does not fit the model's context of {context}")
    return prompt[-room:]


# ---- results ------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    kind: str
    metric: str  # the score's name: exact / contains / f1 / regex, acc, perplexity
    score: float
    ci_low: float | None  # 95% percentile-bootstrap interval of the score (None for perplexity)
    ci_high: float | None
    n: int  # rows scored (perplexity: tokens scored)
    records: list[dict[str, Any]] = field(default_factory=list)  # one per row, in row order
    extra: dict[str, Any] = field(default_factory=dict)  # acc_norm and its interval; perplexity's nll and tokens

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "metric": self.metric, "score": self.score, "ci_low": self.ci_low,
                "ci_high": self.ci_high, "n": self.n, **self.extra}


def _rescore(record: dict[str, Any], kind: str, metric: str) -> dict[str, Any]:
    """The per-example scores from what a record keeps (the output; the log-likelihoods), so a resumed run with
    another metric still scores every row the same way."""
    if kind == "generate":
        return {**record, "score": METRICS[metric](record["output"], record["target"])}
    loglik, tokens = record["loglik"], record["tokens"]
    pred = int(np.argmax(loglik))
    pred_norm = int(np.argmax([ll / t for ll, t in zip(loglik, tokens, strict=True)]))
    return {**record, "pred": pred, "pred_norm": pred_norm, "acc": float(pred == record["target"]),
            "acc_norm": float(pred_norm == record["target"])}


def _summarise(kind: str, metric: str, records: list[dict[str, Any]]) -> EvalResult:
    if kind == "generate":
        scores = [r["score"] for r in records]
        return EvalResult(kind, metric, float(np.mean(scores)), *bootstrap_ci(scores), len(records), records)
    acc, acc_norm = [r["acc"] for r in records], [r["acc_norm"] for r in records]
    low, high = bootstrap_ci(acc_norm)
    return EvalResult(kind, "acc", float(np.mean(acc)), *bootstrap_ci(acc), len(records), records,
                      {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "acc_norm_ci_low": low,
                       "acc_norm_ci_high": high})


def _read_done(out: Path, kind: str, examples: list[Example], samples: int = 1) -> dict[int, dict[str, Any]]:
    """Records an earlier run wrote to `out`, by row index; a partial last line (a run killed mid-write) is cut."""
    if not out.exists():
        return {}
    try:
        text = out.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LmforgeError(f"cannot read {out}: {e}") from None
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        with out.open("r+", encoding="utf-8") as f:
            f.truncate(len(text.encode("utf-8")))
    by_index = {e.index: e for e in examples}
    done: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{out} line {n}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("index"), int) or "kind" not in record:
            raise LmforgeError(f"{out} line {n}: not a record of lmforge eval: use another --out")
        if record["kind"] != kind:
            raise LmforgeError(f"{out} holds {record['kind']} records: use another --out for --kind {kind}")
        example = by_index.get(record["index"])
        if example is None:
            continue  # a row beyond this run's --limit
        if (record.get("prompt"), record.get("target"), record.get("options")) != (
                example.prompt, example.target, example.options):
            raise LmforgeError(f"{out} line {n}: its row ({example.where}) changed since it was scored: use another "
                               "--out")
        kept = ("output",) if kind == "generate" else ("loglik", "tokens")
        if not all(k in record for k in kept):
            raise LmforgeError(f"{out} line {n}: a {kind} record needs {' and '.join(kept)}: use another --out")
        if len(record.get("outputs", [None])) != samples:
            raise LmforgeError(f"{out} line {n}: recorded with --samples {len(record.get('outputs', [None]))}, "
                               f"this run has {samples}: use another --out")
        done[record["index"]] = record
    return done


def _chunks(items: list[Example], size: int) -> Iterator[list[Example]]:
    for begin in range(0, len(items), size):
        yield items[begin : begin + size]


# ---- running ------------------------------------------------------------------------------------------------


def generate_answers(prompts: list[str], model: Transformer | None = None, tokenizer: Tokenizer | None = None,
                     client: Client | None = None, params: SamplingParams | None = None, batch_size: int = 32,
                     wheres: list[str] | None = None, ids: list[list[int]] | None = None, samples: int = 1
                     ) -> list[list[str]]:
    """`samples` answers to each user turn: a local chat model's come through its chat template and the engine (the
    path of `lmforge generate --chat`; a model without a template continues the raw text), a remote model's from
    its chat endpoint. `ids`: prompts already built (render_prompts), sent to the engine as they are."""
    params = params or default_params()
    if client is not None:
        return [["".join(d.text for d in client.stream_chat([{"role": "user", "content": p}], params))
                 for _ in range(samples)] for p in prompts]
    if model is None or tokenizer is None:
        raise LmforgeError("generation needs a model and its tokenizer, or a client")
    if ids is None:
        chat = bool(tokenizer.chat_template)
        ids = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
    for i, row in enumerate(ids):
        if len(row) >= model.cfg.max_seq_len:
            where = wheres[i] if wheres else f"prompt {i}"
            raise LmforgeError(f"{where}: the prompt has {len(row)} tokens, the model's context is "
                               f"{model.cfg.max_seq_len}")
    if samples == 1:
        return [[c.text] for c in complete(model, tokenizer, ids, params, max_batch=batch_size)]
    # all samples of all rows as one engine batch, each sample with its own seed (N draws with one seed would be
    # one answer N times)
    requests = [(row, replace(params, seed=None if params.seed is None else (params.seed + j) % 2**63))
                for row in ids for j in range(samples)]
    done = complete(model, tokenizer, [row for row, _ in requests], [q for _, q in requests],
                    max_batch=len(requests))
    texts = [c.text for c in done]
    return [texts[i * samples : (i + 1) * samples] for i in range(len(ids))]


def _vote(outputs: list[str]) -> dict[str, Any]:
    """The record of sampled answers: the majority answer (the first sample that says it, as written), the share
    that agree with it, and every sample."""
    best, agreement = majority_vote(outputs, vote_key)
    output = next(o for o in outputs if vote_key(o) == best)
    return {"output": output, "outputs": outputs, "agreement": agreement}


def _encode_choice(ex: Example, tokenizer: Tokenizer, context: int) -> tuple[list[int], list[list[int]]]:
    assert ex.options is not None
    pairs = [split_pair(tokenizer, ex.prompt, o) for o in ex.options]
    options = [o for _, o in pairs]
    if not all(options):
        raise LmforgeError(f"{ex.where}: an option encodes to no tokens")
    return _fit(pairs[0][0], options, context, ex.where), options


def _choice_records(examples: list[Example], model: Transformer, tokenizer: Tokenizer) -> Iterator[dict[str, Any]]:
    encoded = [_encode_choice(ex, tokenizer, model.cfg.max_seq_len) for ex in examples]  # all bad rows before work
    # rows go to score_rows together up to GROUP_TOKENS (counted without the sharing): progress and resume
    group: list[int] = []
    size = 0
    for i in range(len(encoded)):
        group.append(i)
        prompt, options = encoded[i]
        size += len(prompt) + sum(len(o) - 1 for o in options)
        upcoming = encoded[i + 1] if i + 1 < len(encoded) else None
        if upcoming is not None:
            more = len(upcoming[0]) + sum(len(o) - 1 for o in upcoming[1])
            if size + more <= GROUP_TOKENS:
                continue
        for j, scores in zip(group, score_rows(model, [encoded[j] for j in group]), strict=True):
            ex, options = examples[j], encoded[j][1]
            yield {"prompt": ex.prompt, "options": ex.options, "target": ex.target, "loglik": scores,
                   "tokens": [len(o) for o in options]}
        group, size = [], 0


def evaluate_examples(
    examples: list[Example], kind: str, model: Transformer | None = None, tokenizer: Tokenizer | None = None,
    client: Client | None = None, metric: str | None = None, params: SamplingParams | None = None,
    out: str | Path | None = None, batch_size: int = 32, progress: bool = False, prompts: PromptSpec | None = None,
    samples: int = 1,
) -> EvalResult:
    """Score the rows; with `out`, rows already recorded there are skipped and the new records appended as each
    batch finishes, so an interrupted run picks up where it stopped. The summary covers every row. `prompts`:
    build each row's prompt with a template and shots (render_prompts); `samples` > 1: score the majority vote
    of that many sampled answers per row (generate; params needs a temperature > 0)."""
    from rich.console import Console
    from rich.progress import Progress

    check_options(kind, metric, remote=client is not None, prompts=prompts is not None, samples=samples)
    if kind == "perplexity":
        raise LmforgeError("perplexity scores a text: use evaluate_perplexity")
    if samples > 1:
        params = params or replace(default_params(), temperature=0.7)
        if params.temperature == 0:
            raise LmforgeError(f"--samples {samples} needs a temperature > 0: greedy answers are all the same")
    metric = metric or "exact"
    if kind == "generate" and metric == "regex":
        for ex in examples:
            try:
                re.compile(str(ex.target))
            except re.error as e:
                raise LmforgeError(f"{ex.where}: the target is not a valid regex ({e})") from None
    if client is None and (model is None or tokenizer is None):
        raise LmforgeError("evaluation needs a model and its tokenizer, or a client")
    if prompts is not None:
        assert model is not None and tokenizer is not None
        examples = render_prompts(examples, kind, prompts, tokenizer, model.cfg.max_seq_len, params)
    out_path = Path(out).expanduser() if out is not None else None
    done = _read_done(out_path, kind, examples, samples) if out_path is not None else {}
    todo = [ex for ex in examples if ex.index not in done]
    scored: Iterator[dict[str, Any]] | None = None
    if kind != "generate" and todo:
        assert model is not None and tokenizer is not None
        scored = _choice_records(todo, model, tokenizer)
    sink = out_path.open("a", encoding="utf-8") if out_path is not None and todo else None
    try:
        with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
            task = bar.add_task(f"eval {kind}", total=len(examples), completed=len(done))
            for batch in _chunks(todo, batch_size):
                if kind == "generate":
                    ids = [ex.ids or [] for ex in batch] if prompts is not None else None
                    outputs = generate_answers([ex.prompt for ex in batch], model, tokenizer, client, params,
                                               batch_size, [ex.where for ex in batch], ids, samples)
                    found = [{"prompt": ex.prompt, "target": ex.target,
                              **(_vote(o) if samples > 1 else {"output": o[0]})}
                             for ex, o in zip(batch, outputs, strict=True)]
                else:
                    assert scored is not None
                    found = [next(scored) for _ in batch]
                for ex, record in zip(batch, found, strict=True):
                    record = {"index": ex.index, "kind": kind, **record}
                    if ex.shots is not None:
                        record["shots"] = ex.shots
                    done[ex.index] = record
                    if sink is not None:
                        sink.write(json.dumps(_rescore(record, kind, metric), ensure_ascii=False) + "\n")
                if sink is not None:
                    sink.flush()
                bar.advance(task, len(batch))
    finally:
        if sink is not None:
            sink.close()
    records = [_rescore(done[ex.index], kind, metric) for ex in examples]
    return _summarise(kind, metric, records)


def evaluate_perplexity(model: Transformer, tokenizer: Tokenizer, text: str, window: int | None = None,
                        stride: int | None = None, limit: int | None = None) -> EvalResult:
    """Token-level perplexity of the text (its first `limit` tokens when given), by eval/perplexity.py."""
    ids = tokenizer.encode(text)
    result = perplexity(model, ids[:limit] if limit is not None else ids, window, stride)
    return EvalResult("perplexity", "perplexity", result.perplexity, None, None, result.tokens, [],
                      {"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens,
                       "bits_per_token": result.nll / result.tokens / math.log(2)})


def evaluate(
    data: str | Path, kind: str, model: Transformer | None = None, tokenizer: Tokenizer | None = None,
    client: Client | None = None, metric: str | None = None, labels: list[str] | None = None,
    params: SamplingParams | None = None, out: str | Path | None = None, limit: int | None = None,
    batch_size: int = 32, window: int | None = None, stride: int | None = None, progress: bool = False,
    prompts: PromptSpec | None = None, samples: int = 1,
) -> EvalResult:
    """Evaluate a model on a data file: JSONL rows for generate/choice/classify, a text for perplexity."""
    check_options(kind, metric, labels, client is not None, out, window, stride, prompts is not None, samples)
    if kind == "perplexity":
        if model is None or tokenizer is None:
            raise LmforgeError("perplexity needs a local model and its tokenizer")
        return evaluate_perplexity(model, tokenizer, read_text(data), window, stride, limit)
    examples = read_examples(data, kind, labels, limit)
    if prompts is not None:
        prompts.load()  # a bad template or pool before any work
    return evaluate_examples(examples, kind, model, tokenizer, client, metric, params, out, batch_size, progress,
                             prompts, samples)
