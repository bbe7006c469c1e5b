"""lmforge: a hackable PyTorch toolkit for the whole life of a language model."""

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

__all__ = ["ModelConfig", "LmforgeError", "load", "embed", "generate", "stream"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:  # heavy imports (torch) only when used
    if name == "load":
        from lmforge.weights.load import load

        return load
    if name == "embed":
        from lmforge.embeddings import embed

        return embed
    if name in ("generate", "stream"):
        import lmforge.generate as g

        return getattr(g, name)
    raise AttributeError(name)
