"""`lmforge align ppo`: RLHF proper. The policy answers prompts, a reward scores the answers, and PPO moves the
policy toward higher reward while a per-token KL penalty keeps it near the reference (the model it started as).

One PPO step = one rollout batch, then `ppo_epochs` passes over it in minibatches; every minibatch is one
optimizer step of the one training loop (loop.py). `Rollouts` is the loop's data: when a step starts a new
cycle it answers the cycle's prompts with the one engine (sampling at temperature 1 is the policy itself),
scores them, and computes with the model as it is then (no gradients):
  old log-probs  log pi_old(a_t | s_t) of each answer token
  values         V(s_t) from a scalar value head on the policy's own last hidden state (shared backbone)
  reference      log pi_ref(a_t | s_t): LoRA adapters switched off (no second copy), or a frozen copy (full)
  rewards        r_t = -kl_coef (log pi_old - log pi_ref) at every token, plus the reward at the last token
  advantages     GAE(gamma, lambda) over the answer tokens, whitened; returns = advantages + values
The loss (PPOObjective) per answer token: the clipped policy objective max(-A r, -A clip(r, 1-e, 1+e)) with
r = pi / pi_old, plus vf_coef times the clipped value loss; the loop divides the sum by the token count.
Checkpoints fall on PPO-step boundaries and the last rollout is kept in OUT/rollout.pt, so --resume (even after a
Ctrl-C mid-step) continues with exactly the rollouts an uninterrupted run would have used.
"""

from __future__ import annotations

import copy
import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.data.collate import IGNORE, Batch, pad_batch
from lmforge.data.preferences import PromptRow, read_prompts
from lmforge.data.sft import pad_id_for, split
from lmforge.errors import LmforgeError
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train import dist as distributed
from lmforge.train.align import TuneOptions, _add_lora, autocast_for, load_decoder, model_source, prompt_ids
from lmforge.train.loop import TrainConfig, train
from lmforge.train.preference import _Tally, unwrap
from lmforge.train.runs import LOOP_KEYS, open_run, write_json

RewardFn = Callable[[list[PromptRow], list[str]], list[float]]


@dataclass
class PPOOptions(TuneOptions):
    model: str
    reward: str  # a reward model folder (align reward) or module:function
    prompts: Path
    out: Path
    val_prompts: Path | None = None
    val_fraction: float = 0.1
    rollouts: int = 16  # prompts answered per PPO step
    ppo_epochs: int = 2
    max_new_tokens: int = 64
    temperature: float = 1.0
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1


# ---- the math -----------------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's masked (answer) positions, (R, T) each.
    delta_t = r_t + gamma V_{t+1} - V_t (V after the last token = 0); A_t = delta_t + gamma lam A_{t+1}.
    Masked positions get 0 and are skipped: the next step of a token is the next masked position.
    Returns (advantages, returns = advantages + values)."""
    R, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(R, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    m = mask.to(rewards.dtype)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m[:, t]
        next_value = torch.where(m[:, t] > 0, values[:, t], next_value)
        next_adv = torch.where(m[:, t] > 0, a, next_adv)
    return adv, (adv + values) * m


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate per token, to minimise: max(-A r, -A clip(r, 1 - e, 1 + e)), r = exp(logp - old).
    Returns (loss, whether the clipped term was the one taken)."""
    ratio = torch.exp(logp - old_logp)
    plain, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(plain, clipped), clipped > plain


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float) -> Tensor:
    """Clipped value loss per token: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -e, e) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def kl_penalty(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL estimate log pi - log pi_ref (its mean over sampled tokens is KL(pi || pi_ref)); 0 when the
    policy is the reference."""
    return logp - ref_logp


def whiten(x: Tensor, mask: Tensor) -> Tensor:
    """Zero mean and unit variance over the masked positions (advantages comparable across batches)."""
    m = mask.bool()
    values = x[m]
    if values.numel() < 2:
        return x * m
    return torch.where(m, (x - values.mean()) / (values.std() + 1e-8), torch.zeros_like(x))


def token_stats(model: nn.Module, tokens: Tensor, answer: Tensor, mask: Tensor, values: bool = True,
                temperature: float = 1.0) -> tuple[Tensor, Tensor | None, Tensor]:
    """For every answer token (the N positions where answer[:, 1:] is set, row-major): its log-prob under the
    distribution the rollouts sampled from (the logits over `temperature`) (N,), the value head at the state
    before it (N,) when asked, and the entropy there (N,), which is logged, not trained."""
    trained = answer[:, 1:].bool()
    hidden = model(tokens[:, :-1], attention_mask=mask[:, :-1], head="hidden")[trained]  # (N, d)
    core = unwrap(model)
    logp_all = torch.log_softmax(core.lm_logits(hidden).float() / temperature, dim=-1)  # (N, V)
    logp = logp_all.gather(1, tokens[:, 1:][trained][:, None])[:, 0]
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    v = core.score(hidden)[:, 0].float() if values else None
    return logp, v, entropy


# ---- rewards ------------------------------------------------------------------------------------------------


def load_reward(spec: str, device: torch.device) -> tuple[RewardFn, str]:
    """A reward model folder or a Python function `module:function` (called with prompt and response, returning
    a number) -> (rewards of rows and responses, a description)."""
    if Path(spec).is_dir():
        from lmforge.train.align import load_reward_model, score

        model, tok = load_reward_model(spec, device)

        def by_model(rows: list[PromptRow], responses: list[str]) -> list[float]:
            return score(model, tok, [r.messages for r in rows], [x if x.strip() else " " for x in responses])

        return by_model, f"reward model {spec}"
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise LmforgeError(f"--reward {spec!r} is neither a reward model folder nor module:function")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a reward module beside the user's data
    try:
        function = getattr(importlib.import_module(module_name), name)
    except Exception as e:  # the user's module: a syntax error or whatever its top level raises, in one line
        raise LmforgeError(f"cannot load the reward function {spec}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if not callable(function):
        raise LmforgeError(f"the reward {spec} is not a function")

    def by_function(rows: list[PromptRow], responses: list[str]) -> list[float]:
        out = []
        for row, response in zip(rows, responses, strict=True):
            where = row.where
            try:
                value = function(row.prompt, response)
            except Exception as e:  # the user's code: whatever it raises is reported, naming the row
                raise LmforgeError(f"the reward function {spec} failed on prompt {where}: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise LmforgeError(f"the reward function {spec} returned {value!r} for prompt {where}: it must "
                                   "return a finite number")
            out.append(float(value))
        return out

    return by_function, f"function {spec}"


# ---- rollouts: the loop's data ------------------------------------------------------------------------------


class Rollouts:
    """TrainData for PPO: optimizer step s belongs to PPO step s // steps_per_cycle; its rows are one minibatch of
    that PPO step's rollouts (each rollout once per PPO epoch, in a seeded order)."""

    def __init__(self, model: Transformer, tok: Tokenizer, prompts: list[PromptRow], reward: RewardFn,
                 opts: PPOOptions, batch_size: int, seed: int, reference: nn.Module | None,
                 train_config: TrainConfig | None = None, saved: Path | None = None) -> None:
        if opts.rollouts % batch_size:
            raise LmforgeError(f"--rollouts {opts.rollouts} is not a multiple of --batch-size {batch_size} (the "
                               "minibatch)")
        self.model, self.tok, self.prompts, self.reward, self.opts = model, tok, prompts, reward, opts
        self.batch_size, self.seed, self.reference = batch_size, seed, reference
        self.ids = prompt_ids(model, tok, prompts)
        self.train_config = train_config or TrainConfig(steps=1)  # its precision: the loop's autocast
        self.saved = saved  # the last rollout on disk: a run stopped mid-cycle resumes with the same rollout
        self.minibatches = opts.rollouts // batch_size
        self.steps_per_cycle = opts.ppo_epochs * self.minibatches
        self.tokens_per_row = max(1, round(sum(map(len, self.ids)) / len(self.ids))) + opts.max_new_tokens
        self.cycle = -1
        self.batch: Batch = {}
        self.stats: dict[str, float] = {}

    def val_batches(self) -> list[Batch]:
        return []

    def global_batch(self, step: int) -> Batch:
        cycle, within = divmod(step, self.steps_per_cycle)
        if cycle != self.cycle:
            self._rollout(cycle)
        epoch, part = divmod(within, self.minibatches)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + cycle * 101 + epoch)
        rows = torch.randperm(self.opts.rollouts, generator=gen)[part * self.batch_size:(part + 1) * self.batch_size]
        width = int(self.batch["mask"][rows].sum(1).max())  # the minibatch's longest row: less padding
        return {k: v[rows][:, : width if k in ("tokens", "mask", "answer") else width - 1]
                for k, v in self.batch.items()}

    def _prompt_rows(self, cycle: int) -> list[int]:
        """The prompts of PPO step `cycle`: consecutive slices of seeded epochs over the prompts."""
        n, R = len(self.prompts), self.opts.rollouts
        out = []
        for g in range(cycle * R, (cycle + 1) * R):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + g // n)).tolist()
            out.append(perm[g % n])
        return out

    def _rollout(self, cycle: int) -> None:
        if self.saved is not None and self.saved.exists():
            kept = torch.load(self.saved, weights_only=False)
            if kept["cycle"] == cycle:
                self.batch, self.stats, self.cycle = kept["batch"], kept["stats"], cycle
                return
        with torch.no_grad(), autocast_for(self.train_config, self.model.tok_emb.weight.device):
            self._new_rollout(cycle)
        if self.saved is not None:
            tmp = self.saved.with_name(self.saved.name + ".partial")
            torch.save({"cycle": cycle, "batch": self.batch, "stats": self.stats}, tmp)
            os.replace(tmp, self.saved)

    def _new_rollout(self, cycle: int) -> None:
        from lmforge.generate import SamplingParams, complete

        o, model = self.opts, self.model
        chosen = self._prompt_rows(cycle)
        params = [SamplingParams(max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_p=1.0, top_k=0,
                                 seed=self.seed * 7919 + cycle * 1009 + j) for j in range(len(chosen))]
        was = model.training
        model.eval()
        done = complete(model, self.tok, [self.ids[i] for i in chosen], params, max_batch=len(chosen))
        answers = [[t.token for t in c.tokens if t.token is not None] + ([c.eos] if c.eos is not None else [])
                   for c in done]
        rows = [self.prompts[i] for i in chosen]
        scores = torch.tensor(self.reward(rows, [c.text for c in done]), dtype=torch.float32)
        device = model.tok_emb.weight.device
        sequences = [self.ids[i] + a for i, a in zip(chosen, answers, strict=True)]
        tokens, mask = pad_batch(sequences, pad_id_for(self.tok))
        answer, _ = pad_batch([[0] * len(self.ids[i]) + [1] * len(a) for i, a in zip(chosen, answers, strict=True)], 0)
        tokens, mask, answer = tokens.to(device), mask.to(device), answer.to(device)
        trained = answer[:, 1:].bool()
        logp, values, _ = token_stats(model, tokens, answer, mask, temperature=o.temperature)
        ref_logp = self._reference_logps(tokens, answer, mask)
        model.train(was)

        def grid(x: Tensor) -> Tensor:  # (N,) answer-token values -> (R, T-1), 0 elsewhere
            out = torch.zeros(trained.shape, dtype=torch.float32, device=device)
            out[trained] = x.float()
            return out

        kl = grid(kl_penalty(logp, ref_logp))
        rewards = -o.kl_coef * kl
        last = trained.long().cumsum(1).argmax(1)  # each row's last answer position
        rewards[torch.arange(len(rows), device=device), last] += scores.to(device)
        old_values = grid(values)
        adv, returns = gae(rewards, old_values, trained, o.gamma, o.lam)
        self.batch = {
            "tokens": tokens.cpu(), "mask": mask.cpu(), "answer": answer.cpu(),
            "labels": torch.where(trained, tokens[:, 1:], IGNORE).cpu(),  # the loop counts answer tokens
            "old_logp": grid(logp).cpu(), "old_values": old_values.cpu(), "returns": returns.cpu(),
            "advantages": whiten(adv, trained).cpu(),
        }
        lengths = trained.sum(1).float()
        self.cycle = cycle
        self.stats = {"ppo_step": cycle + 1, "reward": float(scores.mean()),
                      "reward_std": float(scores.std(correction=0)), "kl": float(kl.sum(1).mean()),
                      "answer_tokens": float(lengths.mean())}

    def _reference_logps(self, tokens: Tensor, answer: Tensor, mask: Tensor) -> Tensor:
        from lmforge.train.lora import adapters_off

        t = self.opts.temperature
        if self.reference is not None:
            return token_stats(self.reference, tokens, answer, mask, values=False, temperature=t)[0]
        with adapters_off(self.model):
            return token_stats(self.model, tokens, answer, mask, values=False, temperature=t)[0]


class PPOObjective:
    """The loop's PPO loss on a minibatch of rollouts: clipped policy loss + vf_coef x clipped value loss, summed
    over answer tokens. Logs the rollouts' reward and KL with the clip fraction, entropy and losses."""

    def __init__(self, opts: PPOOptions, data: Rollouts) -> None:
        self.opts, self.data = opts, data
        self.tally = _Tally()

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        o = self.opts
        trained = batch["answer"][:, 1:].bool()
        logp, values, entropy = token_stats(model, batch["tokens"], batch["answer"], batch["mask"],
                                            temperature=o.temperature)
        assert values is not None
        pg, clipped = policy_loss(logp, batch["old_logp"][trained], batch["advantages"][trained], o.clip)
        vf = value_loss(values, batch["old_values"][trained], batch["returns"][trained], o.value_clip)
        n = int(trained.sum())
        approx_kl = 0.5 * (logp - batch["old_logp"][trained]) ** 2
        self.tally.add(n, policy_loss=pg, value_loss=vf, clip_fraction=clipped.double(), entropy=entropy,
                       approx_kl=approx_kl)
        return (pg + o.vf_coef * vf).sum()

    def take_metrics(self) -> dict[str, float]:
        return {**self.tally.take(), **self.data.stats}


# ---- the run --------------------------------------------------------------------------------------------------


RESUME_KEYS = ("model", "reward", "method", "prompts", "val_prompts", "ppo", "lora", *LOOP_KEYS)


def _record(opts: PPOOptions, tc: TrainConfig) -> dict[str, Any]:
    from lmforge.train.finetune import _file_id

    t = {**asdict(tc), "micro_batch_rows": tc.micro_batch}
    ppo = {k: getattr(opts, k) for k in ("rollouts", "ppo_epochs", "max_new_tokens", "temperature", "kl_coef",
                                          "gamma", "lam", "clip", "value_clip", "vf_coef", "val_fraction")}
    return {"model": opts.model, "reward": opts.reward, "method": opts.method, "prompts": _file_id(opts.prompts),
            "val_prompts": _file_id(opts.val_prompts) if opts.val_prompts else None,
            "ppo": ppo, "lora": opts.lora_record(), **{k: t[k] for k in LOOP_KEYS},
            "steps": tc.steps}


@torch.no_grad()
def held_out(model: Transformer, tok: Tokenizer, rows: list[PromptRow], reward: RewardFn, max_new_tokens: int
             ) -> dict[str, float]:
    """Greedy answers to the held-out prompts: their mean reward and length in words."""
    from lmforge.generate import SamplingParams, complete
    if not rows:
        return {}
    was = model.training
    model.eval()
    ids = prompt_ids(model, tok, rows)
    done = complete(model, tok, ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    model.train(was)
    texts = [c.text for c in done]
    scores = reward(rows, texts)
    return {"reward": sum(scores) / len(scores), "words": sum(len(t.split()) for t in texts) / len(texts)}


def ppo(opts: PPOOptions, ppo_steps: int, tc: TrainConfig, progress: bool = True, quiet: bool = False
        ) -> dict[str, Any]:
    """Run `ppo_steps` PPO steps; returns held-out reward before and after, the last step's statistics and the
    output folders. tc.batch_size is the minibatch (rollouts per optimizer step)."""
    if opts.method not in ("lora", "full"):
        raise LmforgeError(f"unknown method {opts.method!r} (lora, full)")
    for name in ("kl_coef", "gamma", "lam", "clip", "value_clip", "vf_coef", "temperature"):
        if not math.isfinite(getattr(opts, name)) or getattr(opts, name) < 0:
            raise LmforgeError(f"--{name.replace('_', '-')} must be a finite number >= 0")
    if opts.temperature == 0:
        raise LmforgeError("--temperature 0 gives greedy rollouts: PPO needs the policy to explore (use 1)")
    with distributed.session(opts.device) as d:
        if d.world > 1:
            raise LmforgeError("PPO runs in one process (its rollouts are generated by one engine)")
        model, tok = load_decoder(opts.model, d.device, "PPO")
        rows = read_prompts(opts.prompts)
        if opts.val_prompts is not None:
            train_rows, val_rows = rows, read_prompts(opts.val_prompts)
        elif opts.val_fraction > 0:
            train_rows, val_rows = split(rows, opts.val_fraction, tc.seed)  # type: ignore[arg-type]
        else:
            train_rows, val_rows = rows, []
        reward, described = load_reward(opts.reward, d.device)
        torch.manual_seed(tc.seed)
        reference = None
        if opts.method == "full":
            reference = copy.deepcopy(model).requires_grad_(False).eval()
        model.add_label_head(1)  # the value head
        trainable = _add_lora(model, opts, ["score"])
        data = Rollouts(model, tok, train_rows, reward, opts, tc.batch_size, tc.seed, reference, tc,
                        Path(opts.out) / "rollout.pt")
        tc.steps = ppo_steps * data.steps_per_cycle
        tc.save_every = max(1, tc.save_every) * data.steps_per_cycle  # checkpoints at PPO-step boundaries
        tc.eval_every = -1
        out = Path(opts.out)
        record = _record(opts, tc)
        resuming = open_run(out, record, opts.resume, RESUME_KEYS, d)
        if not quiet:
            print(f"{trainable}; reward: {described}; {len(train_rows)} training prompts, {len(val_rows)} held out")
        before = held_out(model, tok, val_rows, reward, opts.max_new_tokens) if not resuming else None
        last = train(model, data, PPOObjective(opts, data), tc, out, d, resume=resuming, progress=progress,
                     quiet=quiet, run_info={"ppo": record})
        after = held_out(model, tok, val_rows, reward, opts.max_new_tokens)
        _drop_value_head(model)
        from lmforge.train.finetune import save_trained

        result = {"kind": "ppo", "before": before, "after": after, "ppo_steps": ppo_steps, "steps": tc.steps,
                  "train_prompts": len(train_rows), "val_prompts": len(val_rows), "trainable": trainable,
                  "last": {k: last[k] for k in ("reward", "kl", "entropy", "clip_fraction", "answer_tokens")
                           if k in last}}
        result.update(save_trained(model, tok, out, opts.method, model_source(opts.model), opts.merge, d))
        write_json(out / "result.json", result)
        return result


def _drop_value_head(model: nn.Module) -> None:
    """The policy leaves without its value head: the saved model is a plain causal LM."""
    del model.score
    model.cfg.n_labels = 0
    cfg = getattr(model, "lora_config", None)
    if cfg is not None:
        cfg.modules_to_save = [m for m in cfg.modules_to_save if m != "score"]


def format_result(result: dict[str, Any]) -> str:
    import json

    before, after = result.get("before") or {}, result.get("after") or {}
    lines = [f"PPO: {result['ppo_steps']} steps ({result['steps']} optimizer steps) on {result['train_prompts']} "
             f"prompts"]
    if after:
        b = f"{before['reward']:.4f}" if "reward" in before else "-"
        lines.append(f"held-out mean reward ({result['val_prompts']} prompts, greedy): {b} -> {after['reward']:.4f}; "
                     f"words {before.get('words', float('nan')):.1f} -> {after['words']:.1f}")
    last = result.get("last") or {}
    if last:
        lines.append("last step: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
    lines.append(json.dumps({k: v for k, v in result.items() if k.endswith("_dir")}))
    return "\n".join(lines)
