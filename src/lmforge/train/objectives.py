"""Pre-training objectives: a window of raw corpus tokens -> a batch, and a batch -> the summed loss.

Every batch is a dict of tensors whose first dimension is the row; `labels` holds the target id of each
predicted position and -100 where nothing is predicted, so the loop can count targets and split rows
across micro-batches and ranks without knowing the objective; `loss` gives the summed cross-entropy.
- clm:  next-token prediction on a decoder (GPT, Llama).
- mlm:  BERT's masked LM on an encoder: 15% of the tokens selected; of those 80% become [MASK], 10% a
        random token, 10% stay; the loss is on the selected ones only.
- span: T5's span corruption on an encoder-decoder: ~15% of the tokens, in spans of mean length 3, are
        each replaced by one sentinel in the input; the target lists each sentinel followed by its span.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.collate import IGNORE, Batch
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

Name = Literal["clm", "mlm", "span"]
FAMILY = {"clm": "decoder", "mlm": "encoder", "span": "encoder-decoder"}


def _special(tok: Tokenizer, names: tuple[str, ...], role: str) -> int:
    for name in names:
        if (i := tok.token_id(name)) is not None:
            return i
    raise LmforgeError(f"the tokenizer has no {role} token ({' or '.join(names)}); train one with the special "
                       "tokens of this objective (`lmforge tokenizer train --kind ...`)")


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed over targets, in fp32 whatever the autocast dtype (the loop divides by the global count)."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="sum")


@dataclass
class CausalLM:
    """Rows of block + 1 corpus tokens -> inputs and the same tokens shifted by one."""

    block: int
    name: Name = "clm"

    @property
    def window(self) -> int:
        return self.block + 1

    def batch(self, windows: Tensor, gen: torch.Generator) -> Batch:
        return {"tokens": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return cross_entropy_sum(model(batch["tokens"]), batch["labels"])


@dataclass
class MaskedLM:
    """Rows of block - 2 corpus tokens -> [CLS] row [SEP] with BERT's 80/10/10 masking."""

    block: int
    vocab_size: int
    cls_id: int
    sep_id: int
    mask_id: int
    specials: tuple[int, ...]
    select: float = 0.15
    name: Name = "mlm"

    @classmethod
    def for_tokenizer(cls, block: int, vocab_size: int, tok: Tokenizer) -> MaskedLM:
        cls_id = _special(tok, ("[CLS]", "<s>"), "[CLS]")
        sep_id = _special(tok, ("[SEP]", "</s>"), "[SEP]")
        mask_id = _special(tok, ("[MASK]", "<mask>"), "[MASK]")
        specials = {cls_id, sep_id, mask_id} | {i for i in (tok.pad_id, tok.token_id(tok.unk_token)) if i is not None}
        return cls(block, vocab_size, cls_id, sep_id, mask_id, tuple(sorted(specials)))

    @property
    def window(self) -> int:
        return self.block - 2

    def batch(self, windows: Tensor, gen: torch.Generator) -> Batch:
        B = windows.shape[0]
        tokens = torch.cat([torch.full((B, 1), self.cls_id), windows, torch.full((B, 1), self.sep_id)], dim=1)
        eligible = ~torch.isin(tokens, torch.tensor(self.specials))  # document separators are never masked
        chosen = (torch.rand(tokens.shape, generator=gen) < self.select) & eligible
        labels = torch.where(chosen, tokens, IGNORE)
        roll = torch.rand(tokens.shape, generator=gen)
        random_ids = torch.randint(0, self.vocab_size, tokens.shape, generator=gen)
        tokens = torch.where(chosen & (roll < 0.8), self.mask_id, tokens)
        tokens = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, tokens)
        return {"tokens": tokens, "labels": labels}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return cross_entropy_sum(model(batch["tokens"], head="mlm"), batch["labels"])


@dataclass
class SpanCorruption:
    """Rows of `raw` corpus tokens -> encoder input (kept tokens, one sentinel per noise span, </s>) and the
    decoder's target (each sentinel, then its span; </s>). Lengths are fixed by `raw`, so rows never pad."""

    raw: int
    eos_id: int
    start_id: int  # decoder start (T5: the pad id)
    sentinels: tuple[int, ...]  # <extra_id_0>, <extra_id_1>, ...
    density: float = 0.15
    mean_span: float = 3.0
    name: Name = "span"

    @classmethod
    def for_tokenizer(cls, block: int, tok: Tokenizer) -> SpanCorruption:
        eos = _special(tok, ("</s>",), "</s>")
        start = tok.pad_id if tok.pad_id is not None else _special(tok, ("<pad>",), "<pad>")
        sentinels = []
        while (i := tok.token_id(f"<extra_id_{len(sentinels)}>")) is not None:
            sentinels.append(i)
        # the longest raw window whose corrupted input (kept + one sentinel per span + </s>) fits the block
        raw = block
        while raw > 2 and cls.lengths_for(raw)[0] > block:
            raw -= 1
        n_spans = cls.lengths_for(raw)[2]
        if len(sentinels) < n_spans:
            raise LmforgeError(f"span corruption of {raw} tokens needs {n_spans} sentinel tokens <extra_id_0>..., "
                               f"the tokenizer has {len(sentinels)} (tokenizers trained with --kind unigram have 100)")
        return cls(raw, eos, start, tuple(sentinels))

    @staticmethod
    def lengths_for(raw: int, density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int, int]:
        """(encoder input length, target length, number of spans) for a raw window."""
        n_noise = min(max(round(raw * density), 1), raw - 1)
        n_spans = max(round(n_noise / mean_span), 1)
        return raw - n_noise + n_spans + 1, n_noise + n_spans + 1, n_spans

    @property
    def window(self) -> int:
        return self.raw

    def _segments(self, total: int, n: int, gen: torch.Generator) -> Tensor:
        """A random split of `total` into `n` positive lengths."""
        cuts = (torch.randperm(total - 1, generator=gen)[: n - 1] + 1).sort().values
        edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])])
        return edges.diff()

    def batch(self, windows: Tensor, gen: torch.Generator) -> Batch:
        _, _, n_spans = self.lengths_for(self.raw, self.density, self.mean_span)
        n_noise = min(max(round(self.raw * self.density), 1), self.raw - 1)
        inputs, targets = [], []
        for row in windows:
            noise_lens = self._segments(n_noise, n_spans, gen)
            keep_lens = self._segments(self.raw - n_noise, n_spans, gen)
            inp, tgt, at = [], [], 0
            for i in range(n_spans):  # kept run, then a noise span, alternating
                inp.append(row[at: at + keep_lens[i]])
                at += int(keep_lens[i])
                inp.append(torch.tensor([self.sentinels[i]]))
                tgt += [torch.tensor([self.sentinels[i]]), row[at: at + noise_lens[i]]]
                at += int(noise_lens[i])
            inputs.append(torch.cat([*inp, torch.tensor([self.eos_id])]))
            targets.append(torch.cat([*tgt, torch.tensor([self.eos_id])]))
        labels = torch.stack(targets)
        decoder_tokens = torch.cat([torch.full((len(labels), 1), self.start_id), labels[:, :-1]], dim=1)
        return {"tokens": torch.stack(inputs), "decoder_tokens": decoder_tokens, "labels": labels}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return cross_entropy_sum(model(batch["tokens"], decoder_tokens=batch["decoder_tokens"]), batch["labels"])


Objective = CausalLM | MaskedLM | SpanCorruption


def make_objective(name: str, block: int, vocab_size: int, tok: Tokenizer) -> Objective:
    if name == "clm":
        return CausalLM(block)
    if name == "mlm":
        return MaskedLM.for_tokenizer(block, vocab_size, tok)
    if name == "span":
        return SpanCorruption.for_tokenizer(block, tok)
    raise LmforgeError(f"unknown objective {name!r} (clm, mlm, span)")
