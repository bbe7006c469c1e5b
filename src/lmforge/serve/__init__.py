"""`lmforge serve`: the OpenAI-compatible API (continuous batching over the one engine) and the chat page."""

from lmforge.serve.app import ApiError, ServeOptions, build, create_app

__all__ = ["ApiError", "ServeOptions", "build", "create_app"]
