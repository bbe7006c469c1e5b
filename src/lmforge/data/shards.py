"""Reading a dataset written by `lmforge data prepare`: meta.json plus raw little-endian token shards.

Layout of DIR: meta.json ({"format": "lmforge-tokens/1", "dtype", "vocab_size", "sep_id", "splits": {"train":
{"shards": [...], "tokens": [...]}, "val": {...}}, ...}), the shard files it names (headerless uint16 or
uint32 arrays), tokenizer.json and stats.json. Each split is one token stream: every document's tokens
followed by sep_id, cut into shards. Imports nothing heavier than numpy.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError

FORMAT = "lmforge-tokens/1"
SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")


def read_meta(folder: str | Path) -> dict[str, Any]:
    """DIR/meta.json, checked: a clear LmforgeError when DIR is not a (finished) prepared dataset."""
    folder = Path(folder)
    path = folder / "meta.json"
    if not path.is_file():
        hint = " (an interrupted `lmforge data prepare`: rerun it to finish)" if (folder / ".prepare").is_dir() else ""
        raise LmforgeError(f"{folder} is not a prepared dataset: no meta.json{hint}; "
                           "make one with `lmforge data prepare`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"bad {path}: {e}") from None
    problem = _meta_problem(meta)
    if problem:
        raise LmforgeError(f"bad {path}: {problem}")
    return meta


def _meta_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return "not a JSON object"
    if meta.get("format") != FORMAT:
        return f"format is {meta.get('format')!r}, expected {FORMAT!r}"
    if meta.get("dtype") not in DTYPES:
        return f"dtype is {meta.get('dtype')!r}, expected one of {', '.join(DTYPES)}"
    for key in ("vocab_size", "sep_id"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            return f"{key} is missing or not a non-negative integer"
    splits = meta.get("splits")
    if not isinstance(splits, dict) or any(s not in splits for s in SPLITS):
        return "splits must name train and val"
    for name, split in splits.items():
        shards, tokens = (split.get("shards"), split.get("tokens")) if isinstance(split, dict) else (None, None)
        if not isinstance(shards, list) or not isinstance(tokens, list) or len(shards) != len(tokens):
            return f"split {name!r} needs equally long lists of shards and tokens"
        for shard, n in zip(shards, tokens, strict=True):
            if not isinstance(shard, str) or not _inside(shard):
                return f"split {name!r}: bad shard path {shard!r}"
            if not isinstance(n, int) or n < 1:
                return f"split {name!r}: bad token count {n!r}"
    return None


def _inside(relative: str) -> bool:
    """A shard path must stay inside DIR: relative, no '..'."""
    path = PurePosixPath(relative)
    return bool(relative) and not path.is_absolute() and ".." not in path.parts


class TokenSplit:
    """One split's token stream, read through memory-mapped shards (opened on first use, read-only)."""

    def __init__(self, folder: str | Path, split: str) -> None:
        if split not in SPLITS:
            raise LmforgeError(f"unknown split {split!r} (train or val)")
        self.folder = Path(folder)
        meta = read_meta(self.folder)
        self.split = split
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.sep_id: int = meta["sep_id"]
        self.vocab_size: int = meta["vocab_size"]
        entry = meta["splits"][split]
        self._paths = [self.folder / s for s in entry["shards"]]
        self._sizes: list[int] = list(entry["tokens"])
        for path, n in zip(self._paths, self._sizes, strict=True):
            expected = n * self.dtype.itemsize
            actual = path.stat().st_size if path.is_file() else None
            if actual != expected:
                found = "missing" if actual is None else f"{actual} bytes"
                raise LmforgeError(f"{path}: shard is {found}, meta.json says {expected} bytes ({n} tokens)")
        self._starts = np.cumsum([0, *self._sizes])  # token offset of each shard; the last entry is the total
        self.n_tokens = int(self._starts[-1])
        self._maps: list[np.memmap | None] = [None] * len(self._paths)

    def __len__(self) -> int:
        return self.n_tokens

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: map the shards again, never pickle them
        state = dict(self.__dict__)
        state["_maps"] = [None] * len(self._paths)
        return state

    def _shard(self, i: int) -> np.memmap:
        shard = self._maps[i]
        if shard is None:
            shard = self._maps[i] = np.memmap(self._paths[i], dtype=self.dtype, mode="r", shape=(self._sizes[i],))
        return shard

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the split as int64, across shard boundaries."""
        if start < 0 or n < 0 or start + n > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + n}) are outside the {self.split} split (0..{self.n_tokens})")
        out = np.empty(n, dtype=np.int64)
        done = 0
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while done < n:
            offset = start + done - int(self._starts[shard])
            take = min(n - done, self._sizes[shard] - offset)
            out[done : done + take] = self._shard(shard)[offset : offset + take]
            done += take
            shard += 1
        return out
