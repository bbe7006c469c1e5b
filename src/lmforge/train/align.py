"""`lmforge align`: tune a model toward what people prefer, through the one training loop (loop.py).

- dpo:    the policy learns directly from preference pairs (train/preference.py's losses); the reference
          log-probs are computed once before training, from the frozen base (LoRA: the same model with its
          adapters off; full: the weights before the first step), so no second copy of the model exists.
- reward: a reward model, the backbone plus a scalar `score` head read at the answer's last token, trained
          with the Bradley–Terry loss; it scores answers (`score`) and drives PPO (train/ppo.py).
- sample: the model's own answers (greedy, then sampled) through the one engine, to rate or to reject.

Output like fine-tuning (finetune.save_trained): LoRA adapters in OUT/adapter (and OUT/merged with --merge), or an
HF folder in OUT for full training; a reward model's folder adds reward.json and score.safetensors.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.data.preferences import (
    PairData,
    PairTokens,
    collate_pairs,
    pair_tokens,
    read_pairs,
    read_prompts,
    render,
)
from lmforge.data.sft import pad_id_for, split
from lmforge.errors import LmforgeError
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train import dist as distributed
from lmforge.train.loop import TrainConfig, train
from lmforge.train.preference import (
    DPOObjective,
    RewardObjective,
    reference_logps,
    reward_scores,
)
from lmforge.train.runs import LOOP_KEYS, export_into, open_run, write_json

REWARD_FILE, SCORE_FILE = "reward.json", "score.safetensors"


@dataclass(kw_only=True)
class TuneOptions:
    """How the policy (or reward model) is trained and saved: LoRA or full; the same for DPO, reward and PPO."""

    method: str = "lora"  # lora | full
    rank: int = 16
    alpha: float = 32.0
    lora_dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    merge: bool = False
    device: str = "auto"
    resume: bool = False

    def lora_record(self) -> dict[str, Any] | None:
        if self.method != "lora":
            return None
        return {"r": self.rank, "alpha": self.alpha, "dropout": self.lora_dropout, "targets": self.targets}


@dataclass
class AlignOptions(TuneOptions):
    model: str
    data: Path
    out: Path
    loss: str = "rpo"  # DPO: sigmoid | robust | ipo | rpo (see train/preference.py)
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 1.0
    val_data: Path | None = None
    val_fraction: float = 0.1
    max_len: int = 1024
    epochs: float = 1.0  # used when TrainConfig.steps is 0


RESUME_KEYS = ("model", "kind", "method", "data", "val_data", "val_fraction", "max_len", "lora", "dpo", *LOOP_KEYS)


def _record(kind: str, opts: AlignOptions, tc: TrainConfig) -> dict[str, Any]:
    from lmforge.train.finetune import _file_id

    t = {**asdict(tc), "micro_batch_rows": tc.micro_batch}
    dpo = {"loss": opts.loss, "beta": opts.beta, "label_smoothing": opts.label_smoothing, "rpo_alpha": opts.rpo_alpha}
    return {"model": opts.model, "kind": kind, "method": opts.method, "data": _file_id(opts.data),
            "val_data": _file_id(opts.val_data) if opts.val_data else None, "val_fraction": opts.val_fraction,
            "max_len": opts.max_len, "lora": opts.lora_record(),
            "dpo": dpo if kind == "dpo" else None, **{k: t[k] for k in LOOP_KEYS}, "steps": tc.steps}


def model_source(name: str) -> str:
    """A model name as a later run can find it again: a local path made absolute, a short name or hub id kept."""
    path = Path(name)
    return str(path.resolve()) if path.exists() else name


def load_decoder(name: str, device: torch.device, what: str) -> tuple[Transformer, Tokenizer]:
    from lmforge.weights.load import load

    model, tok = load(name, "float32", device, inference=False)
    if model.cfg.family != "decoder":
        raise LmforgeError(f"{what} needs a decoder (a chat model); {name} is a {model.cfg.family} model")
    return model, tok


def _pairs(opts: AlignOptions, tok: Tokenizer, ctx: int, seed: int) -> tuple[list[PairTokens], list[PairTokens]]:
    max_len = min(opts.max_len, ctx)
    pairs = pair_tokens(read_pairs(opts.data), tok, max_len, opts.data)
    if opts.val_data is not None:
        return pairs, pair_tokens(read_pairs(opts.val_data), tok, max_len, opts.val_data)
    if opts.val_fraction == 0:
        return pairs, []
    train_rows, val_rows = split(pairs, opts.val_fraction, seed)  # type: ignore[arg-type]
    return train_rows, val_rows  # type: ignore[return-value]


def _add_lora(model: nn.Module, opts: TuneOptions, heads: list[str]) -> str:
    if opts.method == "full":
        return "all parameters"
    from lmforge.train.lora import LoRAConfig, add_lora

    report = add_lora(model, LoRAConfig(r=opts.rank, alpha=opts.alpha, dropout=opts.lora_dropout,
                                        targets=list(opts.targets), modules_to_save=heads))
    return str(report)


def _check(opts: TuneOptions, tc: TrainConfig, d: distributed.Dist) -> None:
    if opts.method not in ("lora", "full"):
        raise LmforgeError(f"unknown method {opts.method!r} (lora, full)")
    if opts.method == "lora" and tc.fsdp and d.world > 1:
        raise LmforgeError("LoRA under FSDP is not supported: use DDP (leave out --fsdp)")


@torch.no_grad()
def pair_metrics(model: nn.Module, batches: list[dict], objective: Any) -> dict[str, float]:
    """The objective's loss per pair and its metrics over `batches` (validation), in eval mode."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    objective.take_metrics()
    for batch in batches:
        total += float(objective(model, batch))
        n += batch["labels"].shape[0]
    model.train(was)
    return {"loss": total / n if n else math.nan, **objective.take_metrics()}


def _steps(tc: TrainConfig, epochs: float, n_train: int) -> None:
    if not tc.steps:
        tc.steps = max(1, math.ceil(epochs * n_train / tc.batch_size))
    if tc.eval_every == 0:
        tc.eval_every = -1  # the caller validates before and after


# ---- DPO ----------------------------------------------------------------------------------------------------


def dpo(opts: AlignOptions, tc: TrainConfig, progress: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Direct preference optimisation; returns validation metrics before and after, and the output folders."""
    objective = DPOObjective(opts.beta, opts.loss, opts.label_smoothing, opts.rpo_alpha)
    return _run_on_pairs("dpo", opts, tc, objective, [], progress, quiet)


def train_reward(opts: AlignOptions, tc: TrainConfig, progress: bool = True, quiet: bool = False) -> dict[str, Any]:
    """A reward model on preference pairs; returns held-out pairwise accuracy before and after."""
    return _run_on_pairs("reward", opts, tc, RewardObjective(), ["score"], progress, quiet)


def _run_on_pairs(kind: str, opts: AlignOptions, tc: TrainConfig, objective: Any, heads: list[str], progress: bool,
                  quiet: bool) -> dict[str, Any]:
    """The one recipe of both: load, read the pairs, (reward: add the score head), LoRA, (DPO: the reference
    log-probs), validate, train through the loop, validate again, save."""
    with distributed.session(opts.device) as d:
        _check(opts, tc, d)
        if kind == "reward" and tc.fsdp and d.world > 1:
            raise LmforgeError("a reward model trains under DDP, not FSDP (leave out --fsdp)")
        model, tok = load_decoder(opts.model, d.device, "DPO" if kind == "dpo" else "a reward model")
        train_rows, val_rows = _pairs(opts, tok, model.cfg.max_seq_len, tc.seed)
        torch.manual_seed(tc.seed)  # a fresh head and LoRA's A matrices: the same on every run and rank
        if kind == "reward":
            model.add_label_head(1)
        trainable = _add_lora(model, opts, heads)
        if kind == "reward" and model.lm_head is not None:
            model.lm_head.requires_grad_(False)  # the score head reads the states; DDP must not wait for LM grads
        result: dict[str, Any] = {"kind": kind}
        if kind == "dpo":
            t0 = time.perf_counter()
            with autocast_for(tc, d.device):  # the loop's precision: at step 0 the policy is its reference exactly
                _fill_reference(model, [*train_rows, *val_rows], tok, tc.micro_batch or tc.batch_size)
            result["ref_seconds"] = time.perf_counter() - t0
        data = PairData(train_rows, val_rows, tc.batch_size, tc.seed, pad_id_for(tok))
        _steps(tc, opts.epochs, len(train_rows))
        out = Path(opts.out)
        record = _record(kind, opts, tc)
        resuming = open_run(out, record, opts.resume, RESUME_KEYS, d)
        if d.rank == 0 and not quiet:
            print(trainable)
        before = pair_metrics(model, data.val_batches(), objective) if val_rows and not resuming else None
        train(model, data, objective, tc, out, d, resume=resuming, progress=progress, quiet=quiet,
              run_info={"align": record})
        after = pair_metrics(model, data.val_batches(), objective) if val_rows else None
        result.update({"before": before, "after": after, "train_pairs": len(train_rows), "val_pairs": len(val_rows),
                       "steps": tc.steps, "trainable": trainable})
        if kind == "dpo":
            from lmforge.train.finetune import save_trained

            result.update(save_trained(model, tok, out, opts.method, model_source(opts.model), opts.merge, d))
        else:
            result["accuracy"] = after["accuracy"] if after else None
            if d.rank == 0:
                save_reward_model(model, tok, out, opts.method, model_source(opts.model))
                result["model_dir"] = str(out)
        if d.rank == 0:
            write_json(out / "result.json", result)
        return result


def autocast_for(tc: TrainConfig, device: torch.device) -> Any:
    """The autocast the loop wraps each forward in (loop.py): numbers computed outside the loop that its loss
    compares against (DPO's reference, PPO's old log-probs) must be computed at the same precision."""
    from lmforge.train.loop import pick_precision

    dtype = pick_precision(tc.precision, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def _fill_reference(model: nn.Module, pairs: list[PairTokens], tok: Tokenizer, batch_size: int) -> None:
    """Each pair's reference log-probs, from the model as it is before training (adapters off)."""
    from lmforge.train.lora import adapters_off

    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)  # similar lengths together: less padding
    chunks = [[pairs[i] for i in order[at: at + batch_size]] for at in range(0, len(order), batch_size)]
    with adapters_off(model):
        logps = reference_logps(model, [collate_pairs(c, pad_id_for(tok)) for c in chunks])
    for chunk, (chosen, rejected) in zip(chunks, logps, strict=True):
        for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
            pair.ref_chosen, pair.ref_rejected = c, r


# ---- reward model -------------------------------------------------------------------------------------------


def save_reward_model(model: nn.Module, tok: Tokenizer, out: Path, method: str, base: str) -> None:
    """OUT/reward.json (what to load), OUT/score.safetensors (the head), and the backbone: LoRA adapters in
    OUT/adapter over `base`, or (full) OUT itself as an HF folder."""
    model.eval()
    head = {"weight": model.score.weight.detach().cpu().contiguous()}
    if method == "lora":
        from lmforge.train.lora import save_adapter

        save_adapter(model, out / "adapter", base)
    else:
        cfg = _without_head(model.cfg)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("score.")}
        export_into(out, cfg, state, tok)
        base = "."
    tok.save(out)
    save_file(head, str(out / SCORE_FILE))
    write_json(out / REWARD_FILE, {"base": base, "method": method, "head": SCORE_FILE})


def _without_head(cfg: Any) -> Any:
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.n_labels = 0
    return cfg


def load_reward_model(path: str | Path, device: str | torch.device | None = None) -> tuple[Transformer, Tokenizer]:
    """A reward model folder written by `align reward` -> (model with its score head, eval mode, frozen; tokenizer)."""
    from lmforge.weights.load import load

    path = Path(path)
    spec_file = path / REWARD_FILE
    if not spec_file.exists():
        raise LmforgeError(f"{path} is not a reward model folder (no {REWARD_FILE}; write one with `lmforge align "
                           "reward`)")
    try:
        spec = json.loads(spec_file.read_text())
        base = path if spec["base"] == "." else spec["base"]
        head = load_file(str(path / spec.get("head", SCORE_FILE)))["weight"]
    except (OSError, ValueError, KeyError) as e:
        raise LmforgeError(f"cannot read the reward model in {path}: {str(e).splitlines()[0][:200]}") from None
    model, tok = load(base, "float32", device, inference=False)
    model.add_label_head(1)
    if spec.get("method") == "lora":
        from lmforge.train.lora import load_adapter, merge_lora

        load_adapter(model, path / "adapter")
        merge_lora(model)
    if tuple(head.shape) != tuple(model.score.weight.shape):
        raise LmforgeError(f"{path}: the score head is {tuple(head.shape)}, the model needs "
                           f"{tuple(model.score.weight.shape)}")
    with torch.no_grad():
        model.score.weight.copy_(head)
    model.requires_grad_(False)
    return model.eval(), tok


@torch.no_grad()
def score(model: nn.Module, tok: Tokenizer, conversations: list[list[dict[str, str]]], responses: list[str],
          batch_size: int = 8, where: list[str] | None = None) -> list[float]:
    """A reward model's score of each (conversation, response), rendered as training rendered its pairs."""
    from lmforge.data.collate import pad_batch

    rows = [p + a for p, a in (render(tok, m, r, where[i] if where else f"row {i + 1}", allow_empty=True)
                               for i, (m, r) in enumerate(zip(conversations, responses, strict=True)))]
    ctx = model.cfg.max_seq_len
    for i, row in enumerate(rows):
        if len(row) > ctx:
            raise LmforgeError(f"{where[i] if where else f'row {i + 1}'}: {len(row)} tokens, more than the reward "
                               f"model's context ({ctx})")
    device = model.tok_emb.weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: less padding
    scores: dict[int, float] = {}
    for at in range(0, len(order), batch_size):
        chunk = order[at: at + batch_size]
        tokens, mask = pad_batch([rows[i] for i in chunk], pad_id_for(tok))
        values = reward_scores(model, tokens.to(device), mask.to(device)).tolist()
        scores.update(zip(chunk, values, strict=True))
    return [scores[i] for i in range(len(rows))]


def score_file(reward: str | Path, data: str | Path, device: str | None = None) -> list[dict[str, Any]]:
    """`align score`: {"prompt" | "messages", "response"} rows -> [{"line", "score"}], in input order."""
    from lmforge.data.preferences import conversation
    from lmforge.data.sft import _text, read_jsonl

    rows = [(n, conversation(r, f"{data} line {n}"), _text(r, "response", f"{data} line {n}"))
            for n, r in read_jsonl(data)]
    if not rows:
        raise LmforgeError(f"{data}: no rows (the file is empty)")
    model, tok = load_reward_model(reward, device)
    values = score(model, tok, [m for _, m, _ in rows], [r for _, _, r in rows],
                   where=[f"{data} line {n}" for n, _, _ in rows])
    return [{"line": n, "score": v} for (n, _, _), v in zip(rows, values, strict=True)]


# ---- the model's own answers ----------------------------------------------------------------------------------


def sample_answers(model_name: str, prompts: str | Path, n: int, out: str | Path, max_new_tokens: int = 256,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, device: str | None = None
                   ) -> int:
    """`align sample`: for each prompt row, answer 0 greedy and answers 1..n-1 sampled (each its own seed), through
    the one engine; rows {prompt|messages, "response", "sample", "greedy", "finish_reason"} in prompt order.
    Returns the number of rows written."""
    from lmforge.generate import SamplingParams, complete
    from lmforge.weights.load import load

    if n < 1:
        raise LmforgeError(f"--n must be at least 1, not {n}")
    rows = read_prompts(prompts)
    model, tok = load(model_name, "float32", device)
    ids = prompt_ids(model, tok, rows)
    jobs = [(i, k) for i in range(len(rows)) for k in range(n)]
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0 if k == 0 else temperature,
                             top_p=top_p, seed=seed * 1_000_003 + i * 1009 + k) for i, k in jobs]
    done = complete(model, tok, [ids[i] for i, _ in jobs], params)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("w") as f:
        for (i, k), c in zip(jobs, done, strict=True):
            m = rows[i].messages
            head = {"prompt": m[0]["content"]} if len(m) == 1 else {"messages": m}
            f.write(json.dumps({**head, "response": c.text, "sample": k, "greedy": k == 0,
                                "finish_reason": c.finish_reason}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return len(jobs)


def prompt_ids(model: Transformer, tok: Tokenizer, rows: list[Any]) -> list[list[int]]:
    """Each prompt row rendered for generation; one that leaves no room to answer in the model's context is an
    error naming its row, before any work starts."""
    out = []
    for r in rows:
        ids = _prompt_ids(tok, r.messages, r.where)
        if len(ids) >= model.cfg.max_seq_len:
            raise LmforgeError(f"{r.where}: the prompt is {len(ids)} tokens, the model's context is "
                               f"{model.cfg.max_seq_len}: no room for an answer")
        out.append(ids)
    return out


def _prompt_ids(tok: Tokenizer, messages: list[dict[str, str]], where: str) -> list[int]:
    """The prompt generation continues from: the conversation's rendering (the answer excluded)."""
    prompt, _ = render(tok, messages, "x", where)  # any answer: the prompt part does not depend on it
    return prompt
