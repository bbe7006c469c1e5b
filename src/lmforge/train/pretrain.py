"""`lmforge pretrain`: a model of any family from a preset or config file, trained from scratch on a prepared
dataset (lmforge data prepare) with its objective, through the one loop; the result is an HF folder.

RUN/ holds run.json (what was asked, checked on --resume), checkpoints/, metrics.jsonl (with a sampled text
at each validation), loss.png and, when done, config.json + model.safetensors + tokenizer.json, which
`lmforge generate --model RUN` and transformers' Auto classes load.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.data.shards import TokenSplit, read_meta
from lmforge.errors import LmforgeError
from lmforge.model.transformer import Transformer
from lmforge.model_info import read_config_file
from lmforge.tokenizer import Tokenizer
from lmforge.train import dist as distributed
from lmforge.train.loop import TrainConfig, checkpoints, full_model_state, train
from lmforge.train.objectives import FAMILY, Batch, Objective, make_objective
from lmforge.train.runs import LOOP_KEYS, export_into, open_run

DEFAULT_OBJECTIVE = {family: name for name, family in FAMILY.items()}
VAL_ROWS = 64  # validation windows (at most): a fixed, repeatable set


class WindowData:
    """A prepared split read as fixed windows. Optimizer step s takes global rows s*B ... s*B + B - 1 of an
    endless sequence of epochs, each a seeded permutation of the windows: every window once per epoch, and the
    rows of any step computable from s alone, which is all that exact resume and rank sharding need."""

    def __init__(self, data_dir: Path, objective: Objective, batch_size: int, seed: int) -> None:
        self.train, self.val = TokenSplit(data_dir, "train"), TokenSplit(data_dir, "val")
        self.objective, self.batch_size, self.seed = objective, batch_size, seed
        self.window = objective.window
        self.stride = objective.window - 1 if objective.name == "clm" else objective.window  # clm windows share a token
        self.n_windows = self.count(self.train)
        if self.n_windows < 1:
            raise LmforgeError(f"the training split has {self.train.n_tokens} tokens, fewer than one window of "
                               f"{self.window}: prepare more text or use a smaller --block-size")
        self.tokens_per_row = self.window - 1 if objective.name == "clm" else self.window
        self._perms: dict[int, torch.Tensor] = {}
        self._val: list[Batch] | None = None

    def count(self, split: TokenSplit) -> int:
        return max((split.n_tokens - self.window) // self.stride + 1, 0) if split.n_tokens >= self.window else 0

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n_windows, generator=gen)
        return self._perms[epoch]

    def _windows(self, split: TokenSplit, starts: list[int]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(split.read(s, self.window)) for s in starts])

    def global_batch(self, step: int) -> Batch:
        rows = range(step * self.batch_size, (step + 1) * self.batch_size)
        starts = [int(self._perm(g // self.n_windows)[g % self.n_windows]) * self.stride for g in rows]
        gen = torch.Generator().manual_seed(self.seed * 7_919 + step)  # masking / span choices of this step
        return self.objective.batch(self._windows(self.train, starts), gen)

    def val_batches(self) -> list[Batch]:
        if self._val is None:  # the first VAL_ROWS windows (or one batch), in batches of the training size
            n = min(self.count(self.val), max(VAL_ROWS, self.batch_size))
            starts = [i * self.stride for i in range(n)]
            self._val = [
                self.objective.batch(self._windows(self.val, starts[i: i + self.batch_size]),
                                     torch.Generator().manual_seed(i))
                for i in range(0, n, self.batch_size)
            ]
        return self._val


@dataclass
class PretrainOptions:
    data: Path
    out: Path
    preset: str | None = None
    config_file: Path | None = None
    objective: str | None = None  # default: the family's (clm, mlm, span)
    block_size: int = 0  # 0 = the config's context
    vocab_size: int = 0  # 0 = the tokenizer's, rounded up to a multiple of 64
    steps: int = 0
    tokens: int = 0  # alternative to steps: train on about this many tokens
    dropout: float = 0.0
    sample_prompt: str = "The"
    sample_tokens: int = 48
    device: str = "auto"
    resume: bool = False


def model_config(opts: PretrainOptions, tok: Tokenizer) -> ModelConfig:
    """The preset or config file, completed from the tokenizer (vocabulary, special ids) and the options."""
    if (opts.preset is None) == (opts.config_file is None):
        raise LmforgeError("give one of --preset or --config")
    if opts.preset is not None:
        cfg = ModelConfig.from_name(opts.preset)
    else:
        cfg = read_config_file(Path(opts.config_file))  # type: ignore[arg-type]
    if opts.vocab_size:
        cfg.vocab_size = opts.vocab_size
    if not cfg.vocab_size:
        cfg.vocab_size = -(-tok.vocab_size // 64) * 64  # whole multiples keep the matmuls aligned
    if cfg.vocab_size < tok.vocab_size:
        raise LmforgeError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                           f"{cfg.vocab_size} ({opts.preset or opts.config_file}): use a vocab size >= "
                           f"{tok.vocab_size} or leave it to the tokenizer")
    if opts.block_size:
        if opts.block_size > cfg.max_seq_len and cfg.pos == "learned":
            raise LmforgeError(f"--block-size {opts.block_size} exceeds the {cfg.max_seq_len} learned positions of "
                               f"{cfg.name}")
        cfg.max_seq_len = max(cfg.max_seq_len, opts.block_size)
    if opts.dropout:
        cfg.dropout = cfg.attn_dropout = opts.dropout
    eos = tok.eos_id if tok.eos_id is not None else tok.token_id("[SEP]")
    cfg.eos_token_ids = [eos] if eos is not None else []
    cfg.bos_token_id = tok.bos_id
    cfg.pad_token_id = tok.pad_id if tok.pad_id is not None else (0 if cfg.family == "encoder-decoder" else None)
    if cfg.family == "encoder-decoder":
        cfg.decoder_start_token_id = cfg.pad_token_id
    return cfg


def _fingerprint(data_dir: Path) -> str:
    return hashlib.sha256((data_dir / "meta.json").read_bytes()).hexdigest()[:16]


RESUME_KEYS = ("model", "objective", "data", "block_size", *LOOP_KEYS)


def _run_record(cfg: ModelConfig, objective: str, block: int, data_dir: Path, tc: TrainConfig) -> dict[str, Any]:
    t = {**asdict(tc), "micro_batch_rows": tc.micro_batch}
    return {"model": cfg.to_dict(), "objective": objective, "data": _fingerprint(data_dir),
            "data_dir": str(data_dir.resolve()), "block_size": block, **{k: t[k] for k in LOOP_KEYS},
            "steps": tc.steps}


def pretrain(opts: PretrainOptions, tc: TrainConfig, progress: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Train from scratch; returns the last metrics record (val_loss, val_ppl, ...)."""
    with distributed.session(opts.device) as d:
        return _pretrain(opts, tc, d, progress, quiet)


def _pretrain(opts: PretrainOptions, tc: TrainConfig, d: distributed.Dist, progress: bool, quiet: bool
              ) -> dict[str, Any]:
    data_dir, out = Path(opts.data), Path(opts.out)
    meta = read_meta(data_dir)
    tok = Tokenizer.from_dir(data_dir)
    cfg = model_config(opts, tok)
    objective_name = opts.objective or DEFAULT_OBJECTIVE[cfg.family]
    if FAMILY.get(objective_name, cfg.family) != cfg.family:
        raise LmforgeError(f"objective {objective_name} trains {FAMILY[objective_name]} models; {cfg.name} is "
                           f"{cfg.family} (use --objective {DEFAULT_OBJECTIVE[cfg.family]})")
    if meta["vocab_size"] > cfg.vocab_size:
        raise LmforgeError(f"the data was tokenised with {meta['vocab_size']} ids, more than the model's "
                           f"vocab_size {cfg.vocab_size}")
    block = opts.block_size or cfg.max_seq_len
    if block < 8:
        raise LmforgeError(f"block size {block} is too small: use at least 8 tokens")
    objective = make_objective(objective_name, block, cfg.vocab_size, tok)
    data = WindowData(data_dir, objective, tc.batch_size, tc.seed)
    if opts.tokens:
        tc.steps = -(-opts.tokens // (tc.batch_size * data.tokens_per_row))
    if tc.steps < 1:
        raise LmforgeError("give --steps or --tokens")
    record = _run_record(cfg, objective_name, block, data_dir, tc)
    resuming = open_run(out, record, opts.resume, RESUME_KEYS, d)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    model = Transformer(cfg).to(d.device)
    if resuming and not checkpoints(out / "checkpoints") and d.rank == 0:
        print(f"note: {out} has no checkpoint yet: starting from step 0")
    # samples decode on rank 0 alone: not under FSDP, whose forward needs every rank
    sample = cfg.family == "decoder" and opts.sample_tokens and not (tc.fsdp and d.world > 1)
    on_eval = _sampler(tok, opts) if sample else None
    last = train(model, data, objective.loss, tc, out, d, resume=resuming, run_info={"pretrain": record},
                 on_eval=on_eval, progress=progress, quiet=quiet)
    state = full_model_state(model, d)  # collective under FSDP: every rank takes part
    if d.rank == 0:
        export_into(out, cfg, state, tok)
    return last


def _sampler(tok: Tokenizer, opts: PretrainOptions) -> Any:
    """After each validation: one sampled continuation of the prompt (fixed seed), logged with the metrics."""
    from lmforge.generate import SamplingParams, complete

    def sample(model: nn.Module, step: int) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        try:
            params = SamplingParams(max_new_tokens=opts.sample_tokens, temperature=0.8, top_p=0.95, seed=0)
            text = complete(model, tok, [opts.sample_prompt], params)[0].text  # type: ignore[arg-type]
        finally:
            model.train(was_training)
        return {"sample": opts.sample_prompt + text}

    return sample
