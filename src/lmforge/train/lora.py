"""LoRA (low-rank adapters) as a module swap on the model's Linears, heads included when named.

`add_lora` freezes the model and swaps each targeted Linear for a `LoRALinear` through model/fast.py's
`swap_linears` (the one seam). Targets are named in the HF vocabulary of the model's family (q_proj, c_attn,
query, wi_0, ...), because adapters are saved in PEFT's format: `save_adapter` writes a folder that
`peft.PeftModel.from_pretrained` loads on the transformers twin of the model, and `load_adapter` reads adapters
written by PEFT. `merge_lora` folds the adapters into the base weights and swaps plain Linears back.

We fuse q|k|v, gate|up and k|v into one Linear, where HF (and so PEFT) has one module per part. A `LoRALinear`
therefore holds one (A, B) pair per targeted *part* and adds each part's update to that part's rows only: a
LoRA on q_proj and v_proj of a fused qkv is exactly PEFT's separate q_proj and v_proj LoRAs, and leaves the k
rows alone. Which rows each part owns comes from weights/names.py (the rules and `part_sizes`, via `to_theirs`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.fast import swap_linears
from lmforge.weights.load import _default_permissions
from lmforge.weights.names import HF_PREFIXES, HF_RULES, Rule, to_theirs

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every Linear except the output head(s)
WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what PEFT puts before the HF module name of every LoRA tensor
# heads whose weight has no rule in weights/names.py (tied to the embedding, or not in the checkpoints we read):
# our module -> the HF module it is
HF_HEADS = {"lm_head": "lm_head", "score": "score", "mlm_head": "cls.predictions.decoder"}
# HF task wrappers (GPT2LMHeadModel, BertFor*) hold their heads beside the base model, outside its prefix
WRAPPER_HEADS = ("lm_head", "score", "classifier", "cls")

Rows = tuple[int, int]  # [start, stop) rows of our (fused) weight


@dataclass
class LoRAConfig:
    """What to adapt, in PEFT's terms. `targets`: HF module names (a suffix such as "q_proj" matches every layer's;
    a full name such as "model.layers.0.self_attn.q_proj" one module) or ["all-linear"]. `modules_to_save`:
    modules trained in full alongside the adapters (e.g. a fine-tune's new "classifier" or "score" head)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # PEFT also takes one name; a regex is expanded by load_adapter
            self.targets = [self.targets]
        if self.r < 1:
            raise LmforgeError(f"LoRA rank r must be >= 1 (got {self.r})")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"LoRA dropout must be in [0, 1) (got {self.dropout})")
        if not self.targets:
            raise LmforgeError("LoRA needs at least one target module (or 'all-linear')")
        if ALL_LINEAR in self.targets and len(self.targets) > 1:
            raise LmforgeError("'all-linear' cannot be combined with other targets: list the modules instead")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """A frozen base Linear plus, for each targeted part, a low-rank update of that part's rows:
    y = base(x); y[rows(p)] += B_p(A_p(dropout(x))) * alpha / r. `parts`: HF part name -> its rows."""

    def __init__(self, base: nn.Module, parts: dict[str, Rows], r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.enabled = True  # off: the base alone (adapters_off: a LoRA model is its own reference model)
        self.rows = dict(sorted(parts.items(), key=lambda item: item[1]))  # in row order: the forward concatenates
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        w = getattr(base, "weight", None)
        device = w.device if isinstance(w, Tensor) else next(base.buffers()).device
        # adapters in full precision even on a bf16/fp16 (or int8) base, as PEFT does: their updates are tiny
        dtype = w.dtype if isinstance(w, Tensor) and w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.ParameterDict()  # part -> (r, in); Parameters, not Linears: no later swap reaches them
        self.lora_B = nn.ParameterDict()  # part -> (rows, r)
        for part, (start, stop) in self.rows.items():
            a = torch.empty(r, self.in_features, device=device, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init
            self.lora_A[part] = nn.Parameter(a)
            self.lora_B[part] = nn.Parameter(torch.zeros(stop - start, r, device=device, dtype=dtype))  # no change yet

    @property
    def weight(self) -> Tensor:  # code that reads a Linear's weight (tied-head checks) sees the base's
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def delta(self, part: str, x: Tensor) -> Tensor:
        """One part's update: (..., in) -> (..., rows of the part)."""
        a, b = self.lora_A[part], self.lora_B[part]
        return F.linear(F.linear(self.dropout(x).to(a.dtype), a), b) * self.scale  # own dropout mask per part

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (..., out)
        if not self.enabled:
            return y
        pieces, at = [], 0
        for part, (start, stop) in self.rows.items():
            if start > at:  # rows of an untargeted part (k of q|k|v): no update
                pieces.append(y.new_zeros(*y.shape[:-1], start - at))
            pieces.append(self.delta(part, x).to(y.dtype))
            at = stop
        if at < self.out_features:
            pieces.append(y.new_zeros(*y.shape[:-1], self.out_features - at))
        return y + torch.cat(pieces, dim=-1)

    def merged_weight(self) -> Tensor:
        """The base weight with every part's B @ A * scale added to its rows (a new tensor, base untouched)."""
        w = self.base.weight.detach().clone()
        for part, (start, stop) in self.rows.items():
            update = (self.lora_B[part].detach().float() @ self.lora_A[part].detach().float()) * self.scale
            w[start:stop] = (w[start:stop].float() + update).to(w.dtype)
        return w

    def extra_repr(self) -> str:
        parts = ", ".join(f"{p}[{s}:{e}]" for p, (s, e) in self.rows.items())
        return f"r={self.r}, alpha={self.alpha}, parts: {parts}"


@dataclass
class LoRAReport:
    """What add_lora did: parameter counts (each shared Parameter once) and which of our modules it touched."""

    trainable: int
    total: int
    modules: list[str]  # our Linears that carry adapters
    saved: list[str] = field(default_factory=list)  # our modules trained in full (modules_to_save)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:  # PEFT's print_trainable_parameters line
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


# ---- our names <-> HF names -------------------------------------------------------------------------------


def _rules(cfg: ModelConfig) -> list[Rule]:
    if cfg.hf_model_type not in HF_RULES:
        raise LmforgeError(f"LoRA names modules in HF terms; model_type {cfg.hf_model_type!r} has no HF names "
                           f"(supported: {', '.join(sorted(HF_RULES))})")
    return HF_RULES[cfg.hf_model_type]


def _wrapper_prefix(cfg: ModelConfig) -> str:
    """The prefix HF's task wrapper puts before the base model's modules (transformer., bert.), for the class
    transformers loads for this model (weights/hf.py's config_to_hf); a bare BertModel has none."""
    if cfg.family == "encoder" and not (cfg.mlm_head or cfg.n_labels):
        return ""
    return HF_PREFIXES.get(cfg.hf_model_type, "")


def _hf_params(cfg: ModelConfig, ours: str, rows: int) -> dict[str, Rows]:
    """Our parameter `ours` ((rows, ...)) -> {HF parameter name, as it sits in the HF task model: its rows in ours}.

    to_theirs splits a fused tensor by the rules and part_sizes; splitting a column of row indices shows where
    each part's rows are, so the row ranges come from the one table that loads and exports checkpoints."""
    probe = torch.arange(rows)
    try:
        theirs = to_theirs(cfg, {ours: probe}, _rules(cfg))
    except LmforgeError:
        module, _, kind = ours.rpartition(".")
        if module not in HF_HEADS:
            raise
        theirs = {f"{HF_HEADS[module]}.{kind}": probe}
    prefix = _wrapper_prefix(cfg)
    out = {}
    for name, piece in theirs.items():
        if prefix and name.split(".")[0] not in WRAPPER_HEADS:
            name = prefix + name
        start = int(piece[0]) if len(piece) else 0
        out[name] = (start, start + len(piece))
    return out


def hf_parts(model: nn.Module, name: str) -> dict[str, Rows]:
    """Our Linear `name` -> {HF module name (task-wrapper prefix included): the rows of our weight it owns}.
    One entry for a plain Linear, one per part for a fused one (q_proj, k_proj, v_proj of our qkv)."""
    linear = model.get_submodule(name)
    params = _hf_params(model.cfg, f"{name}.weight", linear.out_features)
    return {hf.removesuffix(".weight"): rows for hf, rows in params.items()}


def _short(hf_name: str) -> str:
    return hf_name.rsplit(".", 1)[-1]


def _targeted(hf_name: str, targets: list[str]) -> str | None:
    """PEFT's matching: a target names the module exactly or is a suffix of its name at a '.' boundary."""
    return next((t for t in targets if hf_name == t or hf_name.endswith("." + t)), None)


def _linears(model: nn.Module, include_heads: bool) -> list[str]:
    """Our Linears as the swap seam sees them (it decides what a head is)."""
    names: list[str] = []
    swap_linears(model, lambda name, _linear: names.append(name), include_heads)  # appends, returns None: no swap
    return names


def _shared(model: nn.Module) -> set[int]:
    """ids of Parameters reached under more than one name (a tied head and its embedding)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def _whole_name(cfg: ModelConfig, ours: str, rows: int) -> str | None:
    """The HF module whose parameter our parameter `ours` is, whole; None for a part of a fused tensor or a
    parameter without an HF name (a LoRALinear's own)."""
    try:
        hf = _hf_params(cfg, ours, rows)
    except LmforgeError:
        return None
    return next(iter(hf)).rsplit(".", 1)[0] if list(hf.values()) == [(0, rows)] else None


def _whole_modules(model: nn.Module) -> dict[str, str]:
    """{HF module name: our module} for our modules whose every parameter is one whole HF tensor: heads, norms,
    embeddings, unfused Linears."""
    found: dict[str, str] = {}
    for ours, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if ours and params:
            names = {_whole_name(model.cfg, f"{ours}.{pname}", p.shape[0]) for pname, p in params.items()}
            hf = names.pop()
            if hf is not None and not names:
                found[hf] = ours
    return found


def _saved_match(hf: str, wanted: str) -> bool:
    """PEFT's modules_to_save matching: some module on the path to `hf`, itself included, ends with `wanted`
    ("pooler" takes BERT's whole pooler, and so its dense Linear)."""
    parts = hf.split(".")
    return any(".".join(parts[:i]).endswith(wanted) for i in range(1, len(parts) + 1))


def _saved_modules(model: nn.Module, names: list[str], strict: bool = True) -> dict[str, str]:
    """modules_to_save (HF names, PEFT's matching) -> {our module: its HF module name}. Not strict: names that
    match nothing are left out (PEFT lists classifier and score for every SEQ_CLS model)."""
    if not names:
        return {}
    cfg, shared, candidates = model.cfg, _shared(model), _whole_modules(model)
    chosen: dict[str, str] = {}
    for wanted in names:
        hits = {hf: ours for hf, ours in candidates.items() if _saved_match(hf, wanted)}
        if not hits and strict:
            valid = sorted({_short(hf) for hf in candidates})
            raise LmforgeError(f"modules_to_save: no module {wanted!r} in this {cfg.hf_model_type} model, or it is "
                               f"part of a fused projection (valid: {', '.join(valid)})")
        for hf, ours in hits.items():
            if any(id(p) in shared for p in model.get_submodule(ours).parameters()):
                raise LmforgeError(f"modules_to_save: {hf} shares its weights with the embedding (tied head); "
                                   "train it with a LoRA target instead")
            chosen[ours] = hf
    return chosen


def _plan(model: nn.Module, cfg: LoRAConfig, saved: dict[str, str]) -> dict[str, dict[str, Rows]]:
    """Which of our Linears get adapters: ours -> {HF module name of each targeted part: its rows}."""
    all_linear = cfg.targets == [ALL_LINEAR]
    plan: dict[str, dict[str, Rows]] = {}
    used: set[str] = set()
    valid: set[str] = set()
    for name in _linears(model, include_heads=not all_linear):  # all-linear: PEFT leaves the output head(s) out
        parts = hf_parts(model, name)
        valid.update(_short(hf) for hf in parts)
        if name in saved:  # PEFT: a module trained in full never also gets an adapter
            continue
        chosen = {}
        for hf, rows in parts.items():
            target = ALL_LINEAR if all_linear else _targeted(hf, cfg.targets)
            if target is not None:
                chosen[hf] = rows
                used.add(target)
        if chosen:
            plan[name] = chosen
    unknown = [t for t in cfg.targets if t not in used and not all_linear]
    if unknown:
        family = model.cfg.hf_model_type
        raise LmforgeError(f"LoRA target(s) {', '.join(map(repr, unknown))} match no module of this {family} model "
                           f"(valid: {', '.join(sorted(valid))}, or {ALL_LINEAR})")
    if not plan:
        raise LmforgeError("LoRA: no module to adapt")
    return plan


# ---- add, merge ------------------------------------------------------------------------------------------


def loras(model: nn.Module) -> dict[str, LoRALinear]:
    """Our module name -> its LoRALinear, for every adapted Linear of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, cfg: LoRAConfig) -> LoRAReport:
    """Freeze every parameter of `model` and swap each targeted Linear for a LoRALinear (B = 0: the model's
    outputs do not change); modules_to_save stay trainable in full. The config is kept as `model.lora_config`."""
    if loras(model):
        raise LmforgeError("this model already has LoRA adapters (merge_lora them first)")
    if not isinstance(getattr(model, "cfg", None), ModelConfig):
        raise LmforgeError("add_lora needs an lmforge Transformer (its config names the modules)")
    saved = _saved_modules(model, cfg.modules_to_save)
    plan = _plan(model, cfg, saved)
    model.requires_grad_(False)

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        if name not in plan:
            return None
        parts = {_short(hf): rows for hf, rows in plan[name].items()}
        return LoRALinear(linear, parts, cfg.r, cfg.alpha, cfg.dropout)

    swap_linears(model, make)
    for ours in saved:
        model.get_submodule(ours).requires_grad_(True)
    model.lora_config = cfg
    return lora_report(model)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The model as it was before its adapters (the frozen base): DPO's and PPO's reference model without a
    second copy of the weights. A model without adapters is unchanged."""
    found = list(loras(model).values())
    for lora in found:
        lora.enabled = False
    try:
        yield
    finally:
        for lora in found:
            lora.enabled = True


def lora_report(model: nn.Module) -> LoRAReport:
    """Trainable / total parameters now (PEFT's print_trainable_parameters numbers) and the adapted modules."""
    params = list(model.parameters())  # a shared Parameter once
    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    saved = sorted(_saved_modules(model, cfg.modules_to_save)) if cfg else []
    return LoRAReport(trainable=sum(p.numel() for p in params if p.requires_grad),
                      total=sum(p.numel() for p in params), modules=sorted(loras(model)), saved=saved)


def merge_lora(model: nn.Module) -> None:
    """Fold each adapter into its base weight (W[rows] += B @ A * alpha / r per part) and put the plain Linear
    back; the model's state dict has the base names again and its parameters stay frozen.

    A LoRA on a tied head (lm_head sharing the embedding's Parameter) is refused, before anything changes:
    folding it would change the input embeddings too, and untying would give a model that GPT-2 and BERT
    checkpoints cannot express. Keep such an adapter separate (save_adapter / load_adapter)."""
    found = loras(model)
    if not found:
        raise LmforgeError("this model has no LoRA adapters to merge")
    shared = _shared(model)
    for name, lora in found.items():
        w = getattr(lora.base, "weight", None)
        if not isinstance(w, nn.Parameter):
            raise LmforgeError(f"cannot merge LoRA into {name}: its base has no plain weight (quantized?)")
        if id(w) in shared:
            raise LmforgeError(f"cannot merge the LoRA on {name}: it shares its weight with the embedding (tied "
                               "head), which merging would change too; keep this adapter separate (save_adapter)")
    with torch.no_grad():
        for name, lora in found.items():
            lora.base.weight.copy_(lora.merged_weight())
            _put(model, name, lora.base)
    if hasattr(model, "lora_config"):
        del model.lora_config


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# ---- PEFT adapter folders ----------------------------------------------------------------------------------


def _task_type(cfg: ModelConfig) -> str | None:
    """PEFT's task type for the HF class transformers loads for this model."""
    if cfg.n_labels:
        return "SEQ_CLS"
    if cfg.family == "encoder-decoder":
        return "SEQ_2_SEQ_LM"
    if cfg.family == "decoder":
        return "CAUSAL_LM"
    return None if cfg.mlm_head else "FEATURE_EXTRACTION"  # PEFT has no masked-LM task: a plain PeftModel


def _peft_layout(
    model: nn.Module, plan: dict[str, dict[str, Rows]], saved: dict[str, str], r: int
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """PEFT tensor name -> (our parameter name, its shape) for the adapters `plan` puts on `model` and the
    modules trained in full. Computed from names and shapes alone, so it holds before the swap too."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, parts in plan.items():
        n_in = model.get_submodule(name).in_features
        for hf, (start, stop) in parts.items():
            part = _short(hf)
            out[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = (f"{name}.lora_A.{part}", (r, n_in))
            out[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = (f"{name}.lora_B.{part}", (stop - start, r))
    for ours, hf in saved.items():
        for pname, p in model.get_submodule(ours).named_parameters(recurse=False):
            out[f"{PEFT_PREFIX}{hf}.{pname}"] = (f"{ours}.{pname}", tuple(p.shape))
    return out


def _current_plan(model: nn.Module) -> dict[str, dict[str, Rows]]:
    """The adapters on `model`: ours -> {HF module name of each adapted part: its rows}."""
    plan = {}
    for name, lora in loras(model).items():
        by_part = {_short(hf): hf for hf in hf_parts(model, name)}
        plan[name] = {by_part[part]: rows for part, rows in lora.rows.items()}
    return plan


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str,
                 task_type: str | None = "auto") -> None:
    """Write the adapters (and modules_to_save) as PEFT does: adapter_model.safetensors with names
    `base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight`, and adapter_config.json. Each file is
    written beside its final name and renamed into place, the config last. `task_type`: PEFT's; "auto" picks
    the one of the HF class transformers loads for this model."""
    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    if cfg is None or not loras(model):
        raise LmforgeError("this model has no LoRA adapters to save (add_lora or load_adapter first)")
    plan = _current_plan(model)
    layout = _peft_layout(model, plan, _saved_modules(model, cfg.modules_to_save), cfg.r)
    tensors = {peft: model.get_parameter(ours).detach().cpu().contiguous() for peft, (ours, _) in layout.items()}
    targets = cfg.targets
    if targets == [ALL_LINEAR]:  # PEFT writes the modules all-linear found, which is exact whatever the class
        targets = sorted(hf for parts in plan.values() for hf in parts)
    spec = {
        "peft_type": "LORA", "task_type": _task_type(model.cfg) if task_type == "auto" else task_type,
        "base_model_name_or_path": base_model_name_or_path, "revision": None, "inference_mode": True,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets,
        "exclude_modules": None, "modules_to_save": list(cfg.modules_to_save) or None,
        # GPT-2's Conv1D stores (in, out): PEFT transposes its merged delta then, and says so here; the A and B
        # tensors themselves are (r, in) and (out, r) for every layer type, so nothing in the file is transposed
        "fan_in_fan_out": model.cfg.hf_model_type == "gpt2", "bias": "none", "lora_bias": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None,
        "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {}, "auto_mapping": None,
    }
    _write_atomic(Path(folder), tensors, json.dumps(spec, indent=2) + "\n")


def _write_atomic(folder: Path, tensors: dict[str, Tensor], config: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmforgeError(f"cannot create {folder}: {e.strerror or e}") from None
    tag = uuid.uuid4().hex[:12]
    tmp_weights, tmp_config = folder / f".{WEIGHTS_FILE}.{tag}.partial", folder / f".{CONFIG_FILE}.{tag}.partial"
    try:
        save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
        tmp_config.write_text(config)
        for tmp in (tmp_weights, tmp_config):
            _default_permissions(tmp)  # safetensors writes 0600
        os.replace(tmp_weights, folder / WEIGHTS_FILE)
        os.replace(tmp_config, folder / CONFIG_FILE)  # last: a config on disk always has its weights
    except OSError as e:
        raise LmforgeError(f"cannot write the adapter to {folder}: {e.strerror or e}") from None
    finally:
        for tmp in (tmp_weights, tmp_config):
            tmp.unlink(missing_ok=True)


# PEFT options this implementation does not reproduce, with the value that means "off": refused when on, rather
# than loaded into different outputs
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "lora_bias": False, "bias": "none", "rank_pattern": {},
                "alpha_pattern": {}, "layers_to_transform": None, "exclude_modules": None,
                "layer_replication": None, "target_parameters": None, "trainable_token_indices": None}


def _read_spec(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.exists():
        raise LmforgeError(f"{folder} has no {CONFIG_FILE}: not a PEFT adapter folder")
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"bad {CONFIG_FILE} in {folder}: {e}") from None
    if not isinstance(spec, dict) or spec.get("peft_type") != "LORA":
        kind = spec.get("peft_type") if isinstance(spec, dict) else None
        raise LmforgeError(f"{folder} is not a LoRA adapter (peft_type {kind!r})")
    for key, off in _UNSUPPORTED.items():
        value = spec.get(key)
        if not (value == off or value in (None, [], {})):
            raise LmforgeError(f"adapter option {key}={value!r} is not supported")
    return spec


def _config_from_spec(model: nn.Module, spec: dict[str, Any]) -> LoRAConfig:
    """adapter_config.json -> LoRAConfig, its target names in this model's terms."""
    targets = spec.get("target_modules")
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = [ALL_LINEAR]
    elif isinstance(targets, str):  # PEFT: a string is a regex over full module names
        regex = re.compile(targets)
        names = [hf for name in _linears(model, include_heads=True) for hf in hf_parts(model, name)]
        targets = [hf for hf in names if regex.fullmatch(hf)] or [targets]  # no match: add_lora names it
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise LmforgeError(f"bad target_modules in the adapter config: {spec.get('target_modules')!r}")
    prefix = HF_PREFIXES.get(model.cfg.hf_model_type, "")
    if prefix and not _wrapper_prefix(model.cfg):  # made on a task wrapper (BertFor*), loaded into the bare model
        targets = [t.removeprefix(prefix) for t in targets]
    try:
        r, alpha, dropout = int(spec["r"]), float(spec["lora_alpha"]), float(spec.get("lora_dropout") or 0.0)
    except (KeyError, TypeError, ValueError) as e:
        raise LmforgeError(f"bad r / lora_alpha / lora_dropout in the adapter config: {e}") from None
    # PEFT lists its own head names (classifier and score) for SEQ_CLS whether the model has them or not
    saved = [m for m in spec.get("modules_to_save") or [] if _saved_modules(model, [m], strict=False)]
    return LoRAConfig(r=r, alpha=int(alpha) if alpha.is_integer() else alpha, dropout=dropout,
                      targets=list(dict.fromkeys(targets)), modules_to_save=saved)


def _canonical(peft_name: str, cfg: ModelConfig) -> str:
    """A PEFT tensor name without the task wrapper's prefix: adapters made on BertModel and BertFor* agree."""
    prefix = HF_PREFIXES.get(cfg.hf_model_type, "")
    body = peft_name.removeprefix(PEFT_PREFIX)
    return body.removeprefix(prefix) if prefix else body


def load_adapter(model: nn.Module, folder: str | Path) -> LoRAConfig:
    """Add the adapters of a PEFT LoRA folder (written by save_adapter or by PEFT) to `model` and load their
    weights; returns the config. Every tensor of the file must find its place, and every adapter its tensor
    with the right shape: checked before the model changes."""
    folder = Path(folder)
    spec = _read_spec(folder)
    if loras(model):
        raise LmforgeError("this model already has LoRA adapters (merge_lora them first)")
    cfg = _config_from_spec(model, spec)
    if not (folder / WEIGHTS_FILE).exists():
        raise LmforgeError(f"{folder} has no {WEIGHTS_FILE} (a PEFT adapter_model.bin is not read)")
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"corrupt {WEIGHTS_FILE} in {folder}: {str(e).splitlines()[0]}") from None
    state = {_canonical(k, model.cfg): v for k, v in state.items()}

    saved = _saved_modules(model, cfg.modules_to_save)
    plan = _plan(model, cfg, saved)
    layout = {_canonical(k, model.cfg): v for k, v in _peft_layout(model, plan, saved, cfg.r).items()}
    base_layers = _base_layers(model, state)
    expected = {k: shape for k, (_, shape) in layout.items()} | {k: tuple(p.shape) for k, p in base_layers.items()}
    _check_state(state, expected, folder)

    add_lora(model, cfg)
    with torch.no_grad():
        for key, (ours, _) in layout.items():
            model.get_parameter(ours).copy_(state[key])
        for key, param in base_layers.items():  # the same Parameters, now inside the LoRALinears
            param.copy_(state[key])
    return cfg


def _base_layers(model: nn.Module, state: dict[str, Tensor]) -> dict[str, nn.Parameter]:
    """PEFT also saves the whole base weight of a targeted lm_head or embed_tokens (`<module>.base_layer.weight`,
    so that a resized vocabulary travels with the adapter): those keys -> the Parameter of ours they set."""
    keys = [k for k in state if ".base_layer." in k]
    if not keys:
        return {}
    modules = {_canonical(PEFT_PREFIX + hf, model.cfg): ours for hf, ours in _whole_modules(model).items()}
    found = {}
    for key in keys:
        hf, _, pname = key.partition(".base_layer.")
        if hf in modules:  # one we do not know stays unexpected: _check_state names it
            found[key] = model.get_submodule(modules[hf]).get_parameter(pname)
    return found


def _check_state(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], folder: Path) -> None:
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = "; ".join(f"{what} {names[:3]}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                           for what, names in (("missing", missing), ("unexpected", unexpected)) if names)
        raise LmforgeError(f"the adapter in {folder} does not fit this model: {detail}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise LmforgeError(f"the adapter in {folder} does not fit this model: {key} has shape "
                               f"{tuple(state[key].shape)}, expected {shape}")
