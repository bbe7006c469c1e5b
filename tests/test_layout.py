"""Layering: lmforge.text (classical NLP) never imports the model stack, the embedding command's argparse
code lives in embed_cli.py (embeddings.py is library code), and `make install` puts `lmforge` on PATH."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.text import document_similarity

ROOT = Path(__file__).resolve().parent.parent


def test_text_package_does_not_import_the_model_stack() -> None:
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import lmforge.text\n"
        "for m in pkgutil.iter_modules(lmforge.text.__path__):\n"
        "    importlib.import_module('lmforge.text.' + m.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    modules = set(json.loads(out.stdout))
    assert {"lmforge.text", "lmforge.text.cli", "lmforge.text.similarity"} <= modules
    heavy = sorted(m for m in modules if m == "torch" or m.startswith(("torch.", "lmforge.model", "lmforge.weights",
                                                                        "lmforge.embeddings")))
    assert heavy == []


def test_similarity_uses_the_injected_embedding_function() -> None:
    calls = []

    def embed_fn(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])

    sims = document_similarity(["a", "b", "c"], "embedding", embed_fn=embed_fn)
    assert calls == [["a", "b", "c"]]
    np.testing.assert_allclose(sims, [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-6)
    with pytest.raises(LmforgeError, match="embed_fn"):
        document_similarity(["a", "b"], "embedding")
    with pytest.raises(LmforgeError, match="shape"):
        document_similarity(["a", "b"], "embedding", embed_fn=lambda texts: np.zeros((3, 2)))


def test_text_cli_supplies_the_embedding_model(monkeypatch, capsys) -> None:
    import lmforge.embeddings
    from lmforge.text.cli import add_text_commands

    seen = {}

    def fake_embed(texts, model="minilm-l6", **kwargs):
        seen["model"] = model
        return np.eye(len(texts), 4, dtype=np.float32)

    monkeypatch.setattr(lmforge.embeddings, "embed", fake_embed)
    parser = argparse.ArgumentParser()
    add_text_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["text", "similar", "--method", "embedding", "--model", "my-encoder", "--format",
                              "json", "one", "two"])
    assert args.func(args) == 0
    assert seen == {"model": "my-encoder"}
    assert json.loads(capsys.readouterr().out)["pairs"] == [{"a": 0, "b": 1, "embedding": 0.0}]


def test_embed_command_lives_in_embed_cli() -> None:
    import lmforge.cli
    import lmforge.embed_cli
    import lmforge.embeddings

    assert not hasattr(lmforge.embeddings, "add_embed_command") and not hasattr(lmforge.embeddings, "cmd_embed")
    assert "argparse" not in Path(lmforge.embeddings.__file__).read_text()
    assert lmforge.embed_cli.add_embed_command in lmforge.cli._extra_commands()
    parser = lmforge.cli.build_parser()
    assert parser.parse_args(["embed", "hi"]).func is lmforge.embed_cli.cmd_embed


def test_make_install_links_lmforge_onto_path() -> None:
    dry = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert f'ln -sf "{ROOT}/.venv/bin/lmforge" /usr/local/bin/lmforge' in dry.stdout
    assert "[ -w /usr/local/bin ]" in dry.stdout  # only where that is writable
    readme = (ROOT / "README.md").read_text()
    assert "`make install` puts `lmforge` on PATH (a link in /usr/local/bin)" in readme
    assert "`.venv/bin/lmforge` or\n`source .venv/bin/activate`" in readme
