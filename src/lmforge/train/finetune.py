"""`lmforge finetune`: adapt a pretrained model (full or LoRA) on instruction, dialog, domain, classification or
seq2seq data, through the one training loop.

OUT holds run.json, checkpoints/ (only the trainable weights under LoRA), metrics.jsonl, loss.png, labels.json
(classification), and the result: with LoRA an `adapter/` folder in PEFT's format (plus `merged/`, a standalone
HF folder, with --merge); with full fine-tuning OUT itself is the HF folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.data.collate import Batch
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.train import dist as distributed
from lmforge.train.loop import IGNORE, TrainConfig, full_model_state, train
from lmforge.train.objectives import cross_entropy_sum
from lmforge.train.runs import LOOP_KEYS, export_into, open_run, write_json

TASKS = ("instruct", "chat", "domain", "classify", "seq2seq")
FAMILIES = {"instruct": ("decoder",), "chat": ("decoder",), "domain": ("decoder",),
            "classify": ("encoder", "decoder"), "seq2seq": ("encoder-decoder",)}


@dataclass
class FinetuneOptions:
    model: str
    data: Path
    task: str
    out: Path
    method: str = "lora"  # lora | full
    val_data: Path | None = None
    val_fraction: float = 0.1
    max_len: int = 512
    epochs: float = 1.0  # used when TrainConfig.steps is 0
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    merge: bool = False
    grad_checkpointing: bool = False
    base_dtype: str = "float32"  # LoRA: the frozen base may sit in bfloat16 (half the memory); adapters stay fp32
    device: str = "auto"
    resume: bool = False


def logits_for(model: nn.Module, batch: Batch, task: str) -> Tensor:
    """The model's scores for the batch's `labels`: (B, T, V) for the LM tasks (labels are already the next
    tokens), (B, n_labels) for a classification head."""
    if task == "classify":
        return model(batch["tokens"], attention_mask=batch["attention_mask"], head="classify")
    if task == "seq2seq":
        return model(batch["tokens"], attention_mask=batch["attention_mask"], decoder_tokens=batch["decoder_tokens"])
    return model(batch["tokens"], attention_mask=batch.get("attention_mask"))


def loss_for(task: str) -> Callable[[nn.Module, Batch], Tensor]:
    """The loop's loss: summed cross-entropy over the targets (-100: none)."""
    return lambda model, batch: cross_entropy_sum(logits_for(model, batch, task), batch["labels"])


def correct(logits: Tensor, gold: Tensor, task: str) -> tuple[int, int]:
    """(right, counted). Classification: rows whose top class is the label; label words: rows whose answer tokens
    are all the greedy choice (what generating the answer gives); LM tasks: trained tokens predicted exactly."""
    pred, keep = logits.argmax(-1), gold != IGNORE
    if task == "label-words":
        return int(((pred == gold) | ~keep).all(dim=1).sum()), len(gold)
    return int((pred[keep] == gold[keep]).sum()), int(keep.sum())


@torch.no_grad()
def validate(model: nn.Module, batches: list[Batch], task: str, device: torch.device) -> dict[str, float]:
    """Loss per target, accuracy and (LM tasks) perplexity over every validation batch, one forward pass each."""
    was_training = model.training
    model.eval()
    loss_sum, right, total, targets = 0.0, 0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = logits_for(model, batch, task)
        loss_sum += float(cross_entropy_sum(logits, batch["labels"]))
        targets += int((batch["labels"] != IGNORE).sum())
        r, n = correct(logits, batch["labels"], task)
        right, total = right + r, total + n
    model.train(was_training)
    loss = loss_sum / targets if targets else float("nan")
    metrics = {"loss": loss, "accuracy": right / total if total else float("nan")}
    if task not in ("classify", "label-words"):
        metrics["perplexity"] = math.exp(min(loss, 50))
    return metrics


RESUME_KEYS = ("model", "task", "method", "data", "val_data", "val_fraction", "max_len", "lora", "base_dtype",
               *LOOP_KEYS)


def _run_record(opts: FinetuneOptions, tc: TrainConfig) -> dict[str, Any]:
    t = {**asdict(tc), "micro_batch_rows": tc.micro_batch}
    lora = {"r": opts.rank, "alpha": opts.alpha, "dropout": opts.lora_dropout, "targets": opts.targets}
    return {"model": opts.model, "task": opts.task, "method": opts.method, "data": _file_id(opts.data),
            "val_data": _file_id(opts.val_data) if opts.val_data else None, "val_fraction": opts.val_fraction,
            "max_len": opts.max_len, "base_dtype": opts.base_dtype,
            "lora": lora if opts.method == "lora" else None, **{k: t[k] for k in LOOP_KEYS}, "steps": tc.steps}


def _file_id(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def finetune(opts: FinetuneOptions, tc: TrainConfig, progress: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Fine-tune; returns the final validation metrics (loss, perplexity, accuracy) and the run's paths."""
    with distributed.session(opts.device) as d:
        return _finetune(opts, tc, d, progress, quiet)


def _finetune(opts: FinetuneOptions, tc: TrainConfig, d: distributed.Dist, progress: bool, quiet: bool
              ) -> dict[str, Any]:
    from lmforge.data.sft import SFTData, label_word_examples, load_task, pad_id_for, split
    from lmforge.weights.load import load

    if opts.task not in TASKS:
        raise LmforgeError(f"unknown task {opts.task!r} ({', '.join(TASKS)})")
    if opts.method not in ("lora", "full"):
        raise LmforgeError(f"unknown method {opts.method!r} (lora, full)")
    if opts.method == "lora" and tc.fsdp and d.world > 1:
        raise LmforgeError("LoRA under FSDP is not supported: use DDP (leave out --fsdp); the frozen base is "
                           "not trained, so sharding it saves little")
    if opts.base_dtype != "float32" and opts.method != "lora":
        raise LmforgeError("--base-dtype applies to LoRA's frozen base; full fine-tuning trains in float32")
    model, tok = load(opts.model, opts.base_dtype, d.device, inference=False)
    cfg = model.cfg
    if cfg.family not in FAMILIES[opts.task]:
        raise LmforgeError(f"task {opts.task} is for {' or '.join(FAMILIES[opts.task])} models; {opts.model} is "
                           f"a {cfg.family} model")
    # a decoder classifies with label words: the text as an instruction, the label's text as the answer
    words = opts.task == "classify" and cfg.family == "decoder"
    task = "label-words" if words else opts.task
    max_len = min(opts.max_len, cfg.max_seq_len)

    def read(path: Path, labels: list | None = None) -> Any:
        if words:
            return label_word_examples(path, tok, max_len, labels=labels)
        return load_task(opts.task, path, tok, max_len, labels=labels)

    train_set = read(opts.data)
    labels = train_set.labels if opts.task == "classify" else None
    notes = train_set.notes()
    if opts.val_data is not None:
        val_set = read(opts.val_data, labels)
        train_rows, val_rows = list(train_set), list(val_set)
        notes += val_set.notes()
    elif opts.task == "domain":  # blocks follow the documents: the last ones held out, so no text is in both
        rows = list(train_set)
        n_val = max(1, round(len(rows) * opts.val_fraction)) if len(rows) > 1 else 0
        train_rows, val_rows = rows[: len(rows) - n_val], rows[len(rows) - n_val:]
    else:
        train_rows, val_rows = split(list(train_set), opts.val_fraction, tc.seed)
    if not val_rows:
        raise LmforgeError(f"no validation rows: {opts.data} has {len(train_rows)} rows; give --val-data or a "
                           "larger --val-fraction")
    for note in notes if d.rank == 0 and not quiet else []:
        print(f"note: {note}")
    torch.manual_seed(tc.seed)  # a fresh head and LoRA's A matrices: the same on every run (and rank)
    if labels is not None and not words:
        _drop_mlm_head(model)  # unused by classification: DDP would wait for its gradients
        model.add_label_head(len(labels))
        model.cfg.label_names = [str(label) for label in labels]
    data = SFTData(train_rows, val_rows, tc.batch_size, tc.seed, pad_id_for(tok))
    if not tc.steps:
        tc.steps = max(1, math.ceil(opts.epochs * len(train_rows) / tc.batch_size))
    report = _prepare_model(model, opts, labels if not words else None)
    model.grad_checkpointing = opts.grad_checkpointing
    out = Path(opts.out)
    resuming = open_run(out, _run_record(opts, tc), opts.resume, RESUME_KEYS, d)
    if d.rank == 0:
        if labels is not None:
            write_json(out / "labels.json", [str(label) for label in labels])
        if report and not quiet:
            print(report)
    if tc.eval_every == 0:
        tc.eval_every = -1  # the table below validates at the end; the loop need not do it again
    before = validate(model, data.val_batches(), task, d.device) if not resuming else None
    train(model, data, loss_for(task), tc, out, d, resume=resuming, progress=progress, quiet=quiet,
          run_info={"finetune": _run_record(opts, tc)})
    after = validate(model, data.val_batches(), task, d.device)
    result = {"before": before, "after": after, "train_rows": len(train_rows), "val_rows": len(val_rows),
              "steps": tc.steps, "trainable": str(report) if report else "all parameters"}
    _save_result(model, tok, opts, labels, d, result)
    return result


def _drop_mlm_head(model: nn.Module) -> None:
    if model.cfg.mlm_head:
        del model.mlm_dense, model.mlm_norm, model.mlm_head
        model.cfg.mlm_head = False


def _prepare_model(model: nn.Module, opts: FinetuneOptions, labels: list[str] | None) -> Any:
    """LoRA: freeze the base and swap in adapters (a fresh classification head trains in full)."""
    if opts.method == "full":
        return None
    from lmforge.train.lora import LoRAConfig, add_lora

    heads = ["pooler", "classifier"] if labels is not None else []
    return add_lora(model, LoRAConfig(r=opts.rank, alpha=opts.alpha, dropout=opts.lora_dropout,
                                      targets=list(opts.targets), modules_to_save=heads))


def _save_result(model: nn.Module, tok: Tokenizer, opts: FinetuneOptions, labels: list[str] | None,
                 d: distributed.Dist, result: dict[str, Any]) -> None:
    result.update(save_trained(model, tok, Path(opts.out), opts.method, opts.model, opts.merge, d))
    if d.rank == 0:
        write_json(Path(opts.out) / "result.json", result)


def save_trained(model: nn.Module, tok: Tokenizer, out: Path, method: str, base: str, merge: bool,
                 d: distributed.Dist) -> dict[str, str]:
    """The trained model as fine-tuning leaves it: full -> OUT is an HF folder; LoRA -> OUT/adapter (PEFT) and,
    with `merge`, OUT/merged (the base with the adapters folded in). Returns the folders written."""
    model.eval()
    written = {}
    if method == "full":
        state = full_model_state(model, d)
        if d.rank == 0:
            export_into(out, model.cfg, state, tok)
            written["model_dir"] = str(out)
    elif d.rank == 0:
        from lmforge.train.lora import merge_lora, save_adapter

        save_adapter(model, out / "adapter", base)
        tok.save(out / "adapter")
        written["adapter_dir"] = str(out / "adapter")
        if merge:
            merge_lora(model)
            export_into(out / "merged", model.cfg, {k: v.detach().cpu() for k, v in model.state_dict().items()}, tok)
            written["model_dir"] = str(out / "merged")
    return written


def format_result(result: dict[str, Any]) -> str:
    """The final validation table: before / after for each metric."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"validation ({result['val_rows']} rows; trained {result['steps']} steps on "
                        f"{result['train_rows']} rows)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    before = result.get("before") or {}
    for name, value in result["after"].items():
        fmt = "{:.1%}" if name == "accuracy" else "{:.4f}" if name == "loss" else "{:.2f}"
        table.add_row(name, fmt.format(before[name]) if name in before else "-", fmt.format(value))
    buf = StringIO()
    Console(file=buf, width=100).print(table)
    return buf.getvalue() + json.dumps({k: v for k, v in result.items() if k.endswith("_dir")})
