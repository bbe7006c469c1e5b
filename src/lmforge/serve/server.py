"""Load the models and run the app under uvicorn, with a shutdown that lets requests in flight finish."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import uvicorn

from lmforge.errors import LmforgeError
from lmforge.serve.app import ServeOptions, build


class DrainingServer(uvicorn.Server):
    """On SIGINT/SIGTERM: refuse new requests (503) and give those in flight `grace` seconds to finish; streams
    still running then end cleanly (finish_reason "abort", then [DONE]) before the connections close."""

    def __init__(self, config: uvicorn.Config, scheduler: Any, grace: float) -> None:
        super().__init__(config)
        self.scheduler, self.grace = scheduler, grace

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.scheduler.drain(self.grace)
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has shut down, so the process would die by it; a shutdown that
        # finished cleanly exits 0 instead
        getattr(self, "_captured_signals", []).clear()


def serve(model_name: str, dtype: str, options: ServeOptions, embed_model: str | None = None,
          embed_dtype: str = "float32", host: str = "127.0.0.1", port: int = 8000) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    sock = listen(host, port)  # a port in use is an error before the models load, not after
    try:
        _serve(sock, console, model_name, dtype, options, embed_model, embed_dtype, host, port)
    finally:
        sock.close()


def _serve(sock: socket.socket, console: Any, model_name: str, dtype: str, options: ServeOptions,
           embed_model: str | None, embed_dtype: str, host: str, port: int) -> None:
    from lmforge.weights.load import load

    with console.status(f"loading {model_name} ..."):
        model, tokenizer = load(model_name, dtype=dtype)
    if model.cfg.family != "decoder":
        raise LmforgeError(f"{model_name} is a {model.cfg.family} model: the server generates with a decoder")
    encoder = encoder_tokenizer = None
    if embed_model:
        from lmforge.embeddings import load_encoder

        with console.status(f"loading {embed_model} ..."):
            encoder, encoder_tokenizer = load_encoder(embed_model, embed_dtype)
    if options.feedback is not None:
        options.feedback.parent.mkdir(parents=True, exist_ok=True)
    app = build(model, tokenizer, options, encoder, encoder_tokenizer)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=int(options.shutdown_grace) + 5)
    server = DrainingServer(config, app.state.served.scheduler, options.shutdown_grace)
    shown = f"[{host}]" if ":" in host else host
    console.print(f"lmforge serving {model_name} ({dtype}): open http://{shown}:{port}/ for the chat page; the "
                  f"OpenAI-compatible API is at http://{shown}:{port}/v1 (Ctrl-C stops)", soft_wrap=True)
    if options.api_keys:
        console.print("API key required: Authorization: Bearer <key>")
    server.run(sockets=[sock])
    console.print("lmforge serve stopped")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error (uvicorn would log a traceback-free line and exit 1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise LmforgeError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def feedback_path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None
