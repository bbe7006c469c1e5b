"""Load the models and run the app under uvicorn, with a shutdown that lets requests in flight finish."""

from __future__ import annotations

import sys
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


def serve(model_name: str, dtype: str, options: ServeOptions, embed_model: str | None = None,
          embed_dtype: str = "float32", host: str = "127.0.0.1", port: int = 8000) -> None:
    from rich.console import Console

    from lmforge.weights.load import load

    console = Console(stderr=True)
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
    console.print(f"lmforge serving {model_name} ({dtype}) at http://{shown}:{port}/  (chat page; API under /v1)")
    if options.api_keys:
        console.print("API key required: Authorization: Bearer <key>")
    server.run()
    if server.started is False:
        raise LmforgeError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
    sys.stderr.flush()


def feedback_path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None
