"""`lmforge inspect` vouches for a checkpoint without loading it: the weights' headers are read and checked
against the config (every tensor present with its shape, every byte the header promises in the file), so a
truncated or mismatched checkpoint is an error, not a table. And `generate`/`chat` refuse an encoder from its
config alone, before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model_info import inspect_model, model_family


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.llama_folder(tmp_path_factory.mktemp("inspect") / "llama", layers=2)


@pytest.fixture
def copy(llama: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(llama, tmp_path / "copy"))


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""
    return lines[0]


def test_valid_folder(llama: Path, capsys) -> None:
    info = inspect_model(str(llama))
    assert info["family"] == "decoder (llama)" and info["layers"] == 2
    # embeddings + head 2 * 257 * 32, per layer q,o 32x32, k,v 16x32, MLP 3 * 64x32, two norms; final norm
    assert info["parameters"].startswith(f"{2 * 257 * 32 + 2 * (2 * 1024 + 2 * 512 + 3 * 2048 + 64) + 32:,}")
    assert main(["inspect", str(llama)]) == 0
    assert "decoder (llama)" in capsys.readouterr().out


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(copy: Path, keep: float, capsys) -> None:
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(LmforgeError, match="truncated"):
        inspect_model(str(copy))
    assert main(["inspect", str(copy)]) == 2
    assert "model.safetensors" in one_error_line(capsys)


def test_missing_weights(copy: Path, capsys) -> None:
    (copy / "model.safetensors").unlink()
    assert main(["inspect", str(copy)]) == 2
    assert "no model.safetensors" in one_error_line(capsys)


def test_missing_shard(copy: Path, capsys) -> None:
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (copy / "model.safetensors").rename(copy / "model-00001-of-00002.safetensors")
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["inspect", str(copy)]) == 2
    assert "model-00002-of-00002.safetensors" in one_error_line(capsys)


def test_config_declares_more_layers_than_stored(copy: Path, capsys) -> None:
    edit_config(copy, num_hidden_layers=3)
    with pytest.raises(LmforgeError, match=r"weights do not fit the config: missing \['decoder\.2\."):
        inspect_model(str(copy))
    assert main(["inspect", str(copy)]) == 2
    assert "missing" in one_error_line(capsys)


def test_config_declares_fewer_layers_or_other_sizes(copy: Path) -> None:
    edit_config(copy, num_hidden_layers=1)
    with pytest.raises(LmforgeError, match="unexpected"):
        inspect_model(str(copy))
    edit_config(copy, num_hidden_layers=2, intermediate_size=96)
    with pytest.raises(LmforgeError, match=r"wrong shape for decoder\.0\.mlp"):
        inspect_model(str(copy))
    edit_config(copy, intermediate_size=64, num_key_value_heads=4)
    with pytest.raises(LmforgeError, match=r"wrong shape for decoder\.0\.attn\.qkv"):
        inspect_model(str(copy))


def test_gguf(tmp_path: Path, capsys) -> None:
    good = tiny.gguf_file(tmp_path / "good.gguf")
    assert inspect_model(str(good))["storage"] == "GGUF (F16, F32, Q4_0, Q8_0)"
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-100])
    assert main(["inspect", str(truncated)]) == 2
    assert "bad GGUF file" in one_error_line(capsys)
    deeper = tiny.gguf_file(tmp_path / "deeper.gguf", block_count=2)
    with pytest.raises(LmforgeError, match=r"missing \['decoder\.1\."):
        inspect_model(str(deeper))
    no_down = tiny.gguf_file(tmp_path / "no-down.gguf", drop="blk.0.ffn_down.weight")
    assert main(["inspect", str(no_down)]) == 2
    assert "decoder.0.mlp.fc_out.weight" in one_error_line(capsys)


# ---- encoder vs decoder, from the config alone ----------------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("lmforge.weights.load.load", refuse)


def test_generate_and_chat_refuse_an_encoder_before_loading(tmp_path: Path, capsys, no_model_loads) -> None:
    bert = tiny.bert_folder(tmp_path / "bert")
    assert model_family(str(bert)) == "encoder"
    capsys.readouterr()
    for argv in (["generate", "hi", "--model", str(bert)], ["chat", "--model", str(bert)]):
        assert main(argv) == 2
        assert one_error_line(capsys) == (f"error: {bert} is an encoder-only model (bert): it embeds text, "
                                          "use `lmforge embed`")


def test_embed_refuses_a_decoder_before_loading(llama: Path, capsys, no_model_loads) -> None:
    assert model_family(str(llama)) == "decoder"
    capsys.readouterr()
    assert main(["embed", "hi", "--model", str(llama)]) == 2
    assert "decoder-only" in one_error_line(capsys)
