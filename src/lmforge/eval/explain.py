"""A look inside a decoder: per-token log-probabilities (low ones marked, a cheap hallucination signal), the
logit lens (each layer's residual stream read through the final norm and LM head) and attention maps.

Every log-prob comes from sampling.token_logprobs: the engine's for generated tokens, one forward pass's logits
rows for the text's own tokens. Layer outputs are caught with forward hooks on the blocks and attention
probabilities with Attention.keep_weights, so the model's forward is never copied here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.generate import complete, encode_prompt
from lmforge.model.transformer import Transformer
from lmforge.sampling import SamplingParams, token_logprobs
from lmforge.tokenizer import Tokenizer

PNG_DPI = 100


@dataclass
class TokenInfo:
    position: int  # index in the whole sequence (prompt, then generated tokens)
    id: int
    token: str  # this token alone, decoded (special tokens shown)
    logprob: float | None  # log p(token | every token before it); None for the first token (nothing before it)
    top: list[tuple[int, str, float]] = field(default_factory=list)  # the most likely (id, token, log-prob)
    generated: bool = False
    low: bool = False  # probability below the report's threshold

    @property
    def prob(self) -> float | None:
        return None if self.logprob is None else math.exp(self.logprob)

    def as_dict(self) -> dict[str, object]:
        return {"position": self.position, "id": self.id, "token": self.token, "logprob": self.logprob,
                "prob": self.prob, "generated": self.generated, "low": self.low,
                "top": [{"id": i, "token": t, "logprob": lp} for i, t, lp in self.top]}


@dataclass
class LogitLens:
    tokens: list[list[str]]  # (layers, positions): the top token of each layer's output at each position
    ids: Tensor  # (L, T) the same, as token ids
    logits: Tensor  # (L, T, V) final norm + LM head applied to each layer's residual stream


def require_decoder(model: Transformer) -> None:
    if model.cfg.family != "decoder":
        raise LmforgeError(f"explain needs a decoder-only language model; {model.cfg.name} is {model.cfg.family}")


def _piece(tokenizer: Tokenizer, i: int) -> str:
    return tokenizer.decode([i], skip_special_tokens=False)


def _device(model: Transformer) -> torch.device:
    return model.tok_emb.weight.device


def _check_ids(model: Transformer, ids: list[int]) -> None:
    require_decoder(model)
    if not ids:
        raise LmforgeError("empty text: nothing to explain")
    if len(ids) > model.cfg.max_seq_len:
        raise LmforgeError(f"text has {len(ids)} tokens, the model's context is {model.cfg.max_seq_len}")


def token_report(
    model: Transformer, tokenizer: Tokenizer, text: str, chat: bool = False, generate: int = 0, top: int = 3,
    low: float = 0.1, system: str | None = None,
) -> list[TokenInfo]:
    """Each token of `text` (through the chat template with `chat`) with log p(token | the tokens before it),
    then `generate` greedy answer tokens with the engine's own log-probs; `low` marks probabilities below it."""
    require_decoder(model)
    if not text:
        raise LmforgeError("empty text: nothing to explain")
    if not 0 <= top <= 20:
        raise LmforgeError(f"top must be in [0, 20], got {top}")
    if not 0 <= low <= 1:
        raise LmforgeError(f"low must be a probability in [0, 1], got {low}")
    if generate < 0:
        raise LmforgeError(f"generate must be >= 0, got {generate}")
    ids = encode_prompt(tokenizer, text, chat=chat, system=system)
    _check_ids(model, ids)
    if generate and len(ids) + generate > model.cfg.max_seq_len:
        raise LmforgeError(f"text ({len(ids)} tokens) + {generate} generated tokens exceed the model's context "
                           f"({model.cfg.max_seq_len})")

    def info(position: int, token: int, logprob: float | None, alternatives: list[tuple[int, float]],
             generated: bool) -> TokenInfo:
        named = [(i, _piece(tokenizer, i), lp) for i, lp in alternatives]
        is_low = logprob is not None and math.exp(logprob) < low
        return TokenInfo(position, token, _piece(tokenizer, token), logprob, named, generated, is_low)

    report = [info(0, ids[0], None, [], False)]
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=_device(model)))[0]  # (T, V): row t predicts token t + 1
    for t in range(1, len(ids)):
        report.append(info(t, ids[t], *token_logprobs(logits[t - 1], ids[t], top), generated=False))
    if generate:
        params = SamplingParams(max_new_tokens=generate, temperature=0, logprobs=top)
        (completion,) = complete(model, tokenizer, [ids], params)
        for n, out in enumerate(completion.tokens):
            assert out.token is not None
            report.append(info(len(ids) + n, out.token, out.logprob, out.top, generated=True))
    return report


@torch.inference_mode()
def logit_lens(model: Transformer, tokenizer: Tokenizer, ids: list[int]) -> LogitLens:
    """Each decoder block's output (the residual stream after layer l) read through the final norm and the LM
    head, as if the model stopped there: the last layer's is the model's own output."""
    _check_ids(model, ids)
    assert model.decoder is not None
    streams: list[Tensor] = []  # one (1, T, d) per block, in order

    def keep_output(module: torch.nn.Module, args: object, output: Tensor) -> None:
        streams.append(output)

    handles = [block.register_forward_hook(keep_output) for block in model.decoder]
    try:
        model(torch.tensor([ids], device=_device(model)), head="hidden")
    finally:
        for handle in handles:
            handle.remove()
    hidden = torch.cat(streams)  # (L, T, d)
    if model.dec_norm is not None:  # pre-norm stacks: the final norm the head always reads through
        hidden = model.dec_norm(hidden)
    logits = model.lm_logits(hidden).float()  # (L, T, V)
    top_ids = logits.argmax(dim=-1)  # (L, T)
    tokens = [[_piece(tokenizer, i) for i in row] for row in top_ids.tolist()]
    return LogitLens(tokens, top_ids, logits)


def _check_layer_head(model: Transformer, layer: int, head: int) -> None:
    n_layer, n_head = len(model.decoder or []), model.cfg.n_head
    if not 0 <= layer < n_layer:
        raise LmforgeError(f"layer {layer} out of range: {model.cfg.name} has layers 0..{n_layer - 1}")
    if not 0 <= head < n_head:
        raise LmforgeError(f"head {head} out of range: {model.cfg.name} has heads 0..{n_head - 1}")


@torch.inference_mode()
def attention_map(model: Transformer, ids: list[int], layer: int, head: int) -> Tensor:
    """(T, T) attention probabilities of one head of one decoder layer over the text: row i is query token i."""
    _check_ids(model, ids)
    _check_layer_head(model, layer, head)
    assert model.decoder is not None
    attn = model.decoder[layer].attn
    attn.keep_weights = True
    try:
        model(torch.tensor([ids], device=_device(model)), head="hidden")
        assert attn.weights is not None
        return attn.weights[0, head].float().cpu()
    finally:
        attn.keep_weights, attn.weights = False, None


def figure_inches(n_tokens: int) -> float:
    """Side of the square heat map: room for each token's label, within bounds."""
    return min(max(5.0, 1.5 + 0.3 * n_tokens), 30.0)


def save_attention_png(weights: Tensor, tokens: list[str], path: str | Path, title: str = "") -> tuple[int, int]:
    """A heat map of (T, T) attention weights, labelled with the tokens, as a PNG -> its (width, height) pixels."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    T = len(tokens)
    if tuple(weights.shape) != (T, T):
        raise LmforgeError(f"attention weights of shape {tuple(weights.shape)} do not match {T} tokens")
    # labels are literal text: escape mathtext's $ and show control characters
    labels = [repr(t)[1:-1].replace("$", r"\$") for t in tokens]
    side = figure_inches(T)
    fig, ax = plt.subplots(figsize=(side, side), dpi=PNG_DPI)
    try:
        image = ax.imshow(weights.float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(T), labels, fontsize=7)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        with warnings.catch_warnings():  # a token the font lacks a glyph for is drawn as a box, not an error
            warnings.simplefilter("ignore", UserWarning)
            fig.tight_layout()
            try:
                fig.savefig(path, format="png")
            except OSError as e:
                raise LmforgeError(f"cannot write {path}: {e}") from None
    finally:
        plt.close(fig)
    return round(side * PNG_DPI), round(side * PNG_DPI)
