"""What a run leaves to read: metrics.jsonl (one record per step), loss.png, and a live progress bar."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import TracebackType
from typing import Any


class MetricsLog:
    """Appends one JSON record per step. On resume, records past the checkpoint's step are dropped first, so
    the file reads as one uninterrupted run."""

    def __init__(self, path: Path, keep_until: int, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and _step(line) <= keep_until]
            tmp = path.with_name(path.name + ".partial")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line from a kill mid-write: dropped


class ProgressBar:
    """rich: step i/n, loss, tokens/s, ETA, live on a terminal (`live`); each validation also prints one line,
    so a run logged to a file shows its progress too. Silent on other ranks and with --quiet."""

    def __init__(self, total: int, done: int, live: bool = True, quiet: bool = False) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.quiet, self.console = quiet, Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(), console=self.console, disable=quiet or not live,
        )
        self.task = self.progress.add_task("train", total=total, completed=done, stats="")

    def __enter__(self) -> ProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.__exit__(kind, value, tb)

    def update(self, record: dict[str, Any]) -> None:
        stats = f"loss {record['loss']:.3f}  {record['tokens_per_s']:,.0f} tok/s"
        self.progress.update(self.task, completed=record["step"], stats=stats)
        if "val_loss" in record and not self.quiet:
            line = (f"step {record['step']}: train loss {record['loss']:.4f}, val loss {record['val_loss']:.4f}, "
                    f"val ppl {record['val_ppl']:.2f}, {record['tokens_per_s']:,.0f} tok/s")
            if "sample" in record:
                line += f"\n  sample: {record['sample']!r}"
            self.console.print(line, highlight=False, markup=False)


# what alignment's losses log beside the loss (train/preference.py, train/ppo.py): each gets its own panel
PANELS = ("reward", "kl", "entropy", "clip_fraction", "reward_accuracy", "reward_margin", "accuracy")


def plot_losses(metrics: Path, out: Path) -> None:
    """Train loss (raw and smoothed) and validation loss against steps, and a panel for each alignment metric the
    records hold (PPO's reward, KL, entropy, clip fraction; DPO's reward accuracy and margin), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        return
    panels = [k for k in PANELS if any(k in r for r in records)]
    fig, axes = plt.subplots(1 + len(panels), 1, figsize=(7, 4 + 1.8 * len(panels)), dpi=100, squeeze=False,
                             sharex=True)
    ax = axes[0][0]
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    smooth, avg = [], losses[0]
    for x in losses:  # exponential moving average, as training dashboards show it
        avg = 0.9 * avg + 0.1 * x
        smooth.append(avg)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.5, label="train loss (EMA)")
    val = [(r["step"], r["val_loss"]) for r in records if not math.isnan(r.get("val_loss", math.nan))]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation loss")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    for (panel,), name in zip(axes[1:], panels, strict=True):
        points = [(r["step"], r[name]) for r in records if name in r]
        panel.plot(*zip(*points, strict=True), color="tab:green", linewidth=1.2)
        panel.set_ylabel(name.replace("_", " "))
        panel.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    tmp = out.with_name(out.name + ".partial.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
