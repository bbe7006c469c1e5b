"""Small helpers shared by tests (imported as `helpers`: pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from lmforge.generate import SamplingParams, complete
from lmforge.model.transformer import Transformer


def engine_tokens(
    model: Transformer, prompts: list[list[int]], eos_ids: list[int] | None = None, max_batch: int = 32,
    truncate: bool = False, **params,
) -> list[list[int]]:
    """Each prompt's generated token ids through the engine (EOS itself not included)."""
    done = complete(model, None, prompts, SamplingParams(**params), truncate=truncate, max_batch=max_batch,
                    eos_ids=eos_ids)
    return [[o.token for o in c.tokens] for c in done]


@torch.no_grad()
def manual_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens by full forwards without a cache: the reference the engine must equal."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def randomized(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """A reference model moved off its init (zero biases, unit norms) so every weight matters; eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """(T, V) logits of a transformers causal LM for one prompt."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve an ASGI app with a real uvicorn on a free loopback port (in a thread); yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
