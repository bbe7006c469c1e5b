"""Run folders: what a training command was asked (run.json), checked before anything is written, so that a
rerun never overwrites another run and --resume continues only the same one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.train import dist as distributed

# the loop's settings that must match for --resume to continue the same run (steps may grow: the schedule follows)
LOOP_KEYS = ("batch_size", "micro_batch_rows", "seed", "lr", "min_lr", "warmup", "weight_decay", "beta1", "beta2",
             "grad_clip", "precision")


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def check_run_folder(out: Path, record: dict[str, Any], resume: bool, keys: tuple[str, ...]) -> bool:
    """Whether there is a run to continue; refuses a folder that holds something else or another run."""
    run_file = out / "run.json"
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{out} is a file, not a run folder")
    if not run_file.exists():
        if out.exists() and any(out.iterdir()):
            raise LmforgeError(f"{out} exists and is not a run folder: choose a new --out")
        return False
    if not resume:
        raise LmforgeError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    try:
        old = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"cannot read {run_file}: {e}") from None
    changed = [k for k in keys if old.get(k) != record.get(k)]
    if changed:
        raise LmforgeError(f"cannot resume {out}: it was started with another {', '.join(changed)} "
                           "(use the same options, or a new --out)")
    return True


def open_run(out: Path, record: dict[str, Any], resume: bool, keys: tuple[str, ...], d: distributed.Dist) -> bool:
    """Check RUN on every rank, then rank 0 writes run.json; returns whether this continues an earlier run."""
    resuming = check_run_folder(out, record, resume, keys)
    distributed.barrier(d)  # every rank has looked at RUN before rank 0 writes into it
    if d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", record)
        (out / "checkpoints").mkdir(exist_ok=True)
    distributed.barrier(d)
    return resuming


def export_into(folder: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tok: Tokenizer) -> None:
    """Trained weights as an HF folder's files (config.json, model.safetensors, tokenizer) written into `folder`
    beside whatever else it holds (checkpoints, metrics), each file renamed into place when complete."""
    from lmforge.weights.check import meta_model
    from lmforge.weights.load import build, export_hf

    tied = set(meta_model(cfg).tied_names())
    model = build(cfg, {k: v for k, v in state.items() if k not in tied}, torch.float32, "cpu", inference=False)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=folder) as tmp:
        export_hf(model.eval(), tok, Path(tmp))
        for path in sorted(Path(tmp).iterdir()):
            target = folder / path.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(path, target)
