"""What `--stats` prints after a generation, as `ollama run --verbose` does: load time, prompt and
generation token counts and speeds, peak memory."""

from __future__ import annotations

import resource
import sys

import torch

from lmforge.engine import Usage


def peak_memory() -> str:
    """Peak resident memory of this process (and peak CUDA memory when a GPU was used)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    text = f"{rss / 2**30:.2f} GiB RSS"
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        text += f", {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB CUDA"
    return text


def format_stats(load_seconds: float, usage: Usage) -> str:
    prefill_rate = usage.prompt_tokens / usage.prefill_seconds if usage.prefill_seconds > 0 else 0.0
    # the first token comes out of the prefill: decode speed counts the tokens after it
    decoded = max(usage.completion_tokens - 1, 0)
    decode_rate = decoded / usage.decode_seconds if usage.decode_seconds > 0 else 0.0
    rows = [
        ("load duration", f"{load_seconds:.2f}s"),
        ("prompt eval count", f"{usage.prompt_tokens} token(s)"),
        ("prompt eval duration", f"{usage.prefill_seconds:.3f}s"),
        ("prompt eval rate", f"{prefill_rate:.2f} tokens/s"),
        ("eval count", f"{usage.completion_tokens} token(s)"),
        ("eval duration", f"{usage.decode_seconds:.3f}s"),
        ("eval rate", f"{decode_rate:.2f} tokens/s"),
        ("peak memory", peak_memory()),
    ]
    return "\n".join(f"{k + ':':<22}{v}" for k, v in rows)
