"""`lmforge eval compare`: prompt variants (template, shots, selection, model, samples) scored on the same rows,
side by side, with their bootstrap intervals and a bar chart.

A variant is written NAME:key=value,key=value with keys template (a .jinja file), shots (K from the shared
pool), select (first / random / similar), seed, model and samples; a key left out takes the harness default
(the default template, no shots, `first`, compare's model, one greedy answer)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import LmforgeError
from lmforge.eval.harness import EvalResult, PromptSpec, check_options, evaluate_examples, read_examples
from lmforge.prompts import SELECTIONS, Pool, read_pool
from lmforge.sampling import SamplingParams
from lmforge.weights.registry import DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL

if TYPE_CHECKING:
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

VARIANT_KEYS = ("template", "shots", "select", "seed", "model", "samples")
KINDS = ("generate", "choice", "classify")


@dataclass(frozen=True)
class Variant:
    name: str
    template: str | None = None  # None: lmforge.prompts' default template
    shots: int = 0
    select: str = "first"
    seed: int | None = None
    model: str | None = None  # None: compare's model
    samples: int = 1


def _int(spec: str, key: str, value: str, low: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if number < low or number >= 2**63:
        raise LmforgeError(f"--variant {spec!r}: {key} must be an integer >= {low}, got {value!r}")
    return number


def parse_variant(spec: str) -> Variant:
    """NAME or NAME:key=value,key=value -> Variant; a bad spec is a one-line LmforgeError quoting it."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise LmforgeError(f"--variant {spec!r}: a variant needs a name before the colon (NAME:key=value,...)")
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if key not in VARIANT_KEYS:
            raise LmforgeError(f"--variant {spec!r}: unknown key {key!r} (keys: {', '.join(VARIANT_KEYS)})")
        if not eq or not value:
            raise LmforgeError(f"--variant {spec!r}: {key} needs a value ({key}=...)")
        if key in values:
            raise LmforgeError(f"--variant {spec!r}: {key} is given twice")
        if key in ("shots", "seed"):
            values[key] = _int(spec, key, value, 0)
        elif key == "samples":
            values[key] = _int(spec, key, value, 1)
        elif key == "select" and value not in SELECTIONS:
            raise LmforgeError(f"--variant {spec!r}: select must be one of {', '.join(SELECTIONS)}, got {value!r}")
        else:
            values[key] = value
    return Variant(name, **values)


@dataclass
class VariantResult:
    variant: Variant
    model: str  # the model it ran on
    result: EvalResult

    def row(self) -> dict[str, Any]:
        v, r = self.variant, self.result
        return {"variant": v.name, "model": self.model, "template": v.template, "shots": v.shots,
                "select": v.select, "samples": v.samples, "metric": r.metric, "score": r.score, "ci_low": r.ci_low,
                "ci_high": r.ci_high, "n": r.n}


def best(results: Sequence[VariantResult]) -> int:
    """The index of the highest score; a tie goes to the first listed."""
    scores = [r.result.score for r in results]
    return scores.index(max(scores))


Loader = Callable[[str], "tuple[Transformer, Tokenizer]"]


def compare(
    data: str | Path, kind: str, variants: Sequence[Variant], model: str = DEFAULT_CHAT_MODEL,
    pool: str | Path | Pool | None = None, metric: str | None = None, labels: list[str] | None = None,
    params: SamplingParams | None = None, temperature: float | None = None, limit: int | None = None,
    batch_size: int = 32, embed_model: str | Path = DEFAULT_EMBED_MODEL, dtype: str = "auto",
    loader: Loader | None = None, progress: bool = False,
) -> list[VariantResult]:
    """Score every variant on the same rows of `data`, in the order given. Each distinct model loads once, by
    `loader` (default: lmforge.weights.load.load at `dtype`). `temperature` None: greedy, 0.7 for a variant with
    samples > 1."""
    if not variants:
        raise LmforgeError("compare needs at least one --variant")
    names = [v.name for v in variants]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise LmforgeError(f"two variants are named {twice!r}")
    if kind not in KINDS:
        raise LmforgeError(f"compare scores --kind {', '.join(KINDS)}, not {kind!r}")
    for v in variants:
        check_options(kind, metric, labels, prompts=True, samples=v.samples)
        if v.samples > 1 and temperature == 0:
            raise LmforgeError(f"variant {v.name}: samples={v.samples} needs a temperature > 0: greedy answers are "
                               "all the same")
    # everything that can be wrong is refused before the first (slow) model load
    examples = read_examples(data, kind, labels, limit)
    shared = pool if isinstance(pool, Pool) or pool is None else read_pool(pool)  # its embeddings computed once
    specs = []
    for v in variants:
        spec = PromptSpec(v.template, v.shots, shared, v.select, v.seed if v.seed is not None else 0, embed_model)
        try:
            template, _ = spec.load()
        except LmforgeError as e:
            raise LmforgeError(f"variant {v.name}: {e}") from None
        specs.append(replace(spec, template=template))
    base = params or SamplingParams(max_new_tokens=128, temperature=0.0)
    load = loader or (lambda name: _load(name, dtype))
    models: dict[str, tuple[Transformer, Tokenizer]] = {}
    results = []
    for v, spec in zip(variants, specs, strict=True):
        name = v.model or model
        if name not in models:
            models[name] = load(name)
        m, tok = models[name]
        t = temperature if temperature is not None else (0.7 if v.samples > 1 else 0.0)
        try:
            result = evaluate_examples(examples, kind, m, tok, metric=metric, params=replace(base, temperature=t),
                                       batch_size=batch_size, progress=progress, prompts=spec, samples=v.samples)
        except LmforgeError as e:
            raise LmforgeError(f"variant {v.name}: {e}") from None
        results.append(VariantResult(v, name, result))
    return results


def _load(name: str, dtype: str) -> tuple[Transformer, Tokenizer]:
    from rich.console import Console

    from lmforge.model_info import require_generator
    from lmforge.weights.load import load

    require_generator(name)
    with Console(stderr=True).status(f"loading {name} ..."):
        return load(name, dtype=dtype)


def plot(results: Sequence[VariantResult], path: str | Path, title: str = "") -> Path:
    """A bar per variant with its 95% interval as the error bar, the best one highlighted; a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    path = Path(path).expanduser()
    top = best(results)
    scores = [r.result.score for r in results]
    lows = [r.result.score - (r.result.ci_low if r.result.ci_low is not None else r.result.score) for r in results]
    highs = [(r.result.ci_high if r.result.ci_high is not None else r.result.score) - r.result.score for r in results]
    colors = ["tab:orange" if i == top else "tab:blue" for i in range(len(results))]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(results) + 2), 4))
    try:
        ax.bar([r.variant.name for r in results], scores, yerr=[lows, highs], capsize=6, color=colors)
        for i, score in enumerate(scores):  # at the foot of the bar: clear of the error bar, seen even at 0
            ax.text(i, 0.02, f"{score:.2f}", ha="center", va="bottom", fontweight="bold")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"{results[0].result.metric} (95% bootstrap interval)")
        ax.set_title(title or f"best: {results[top].variant.name}")
        ax.tick_params(axis="x", labelrotation=20 if len(results) > 4 else 0)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fig.savefig(path, dpi=120)
        except OSError as e:
            raise LmforgeError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path
