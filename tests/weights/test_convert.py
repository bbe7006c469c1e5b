"""`lmforge convert` is all or nothing: the source is loaded before the destination is touched, the export is
renamed into place only once complete, a failure leaves the destination as it was, and nothing is ever written
over the source or the current folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import tiny
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.weights import load as load_module
from lmforge.weights.load import convert, load


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.llama_folder(tmp_path_factory.mktemp("src") / "llama")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def same_weights(a: Path, b: Path) -> bool:
    ma, mb = load(a, torch.float32)[0].state_dict(), load(b, torch.float32)[0].state_dict()
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_convert_writes_a_complete_folder_with_normal_permissions(src: Path, tmp_path: Path, umask_022) -> None:
    dst = tmp_path / "new" / "deeper" / "out"  # missing parents are created
    cfg = convert(src, dst)
    assert cfg.hf_model_type == "llama"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(snapshot(dst))
    for path in [dst, *dst.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    assert same_weights(src, dst)
    assert leftovers(dst.parent) == []


def test_permissions_follow_the_umask(src: Path, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        convert(src, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750


def test_force_replaces_the_whole_folder_only_after_success(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    (dst / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    with pytest.raises(LmforgeError, match="not empty"):
        convert(src, dst)
    assert snapshot(dst) == {"notes.txt": b"mine", "model-00001-of-00002.safetensors": b"old shard"}
    convert(src, dst, force=True)
    assert "notes.txt" not in snapshot(dst) and "model-00001-of-00002.safetensors" not in snapshot(dst)
    assert same_weights(src, dst)
    assert leftovers(tmp_path) == []


def test_failed_load_leaves_the_destination_untouched(src: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    tiny.llama_folder(broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "model.safetensors").write_bytes(b"precious")
    before = snapshot(dst)
    with pytest.raises(LmforgeError, match="truncated"):
        convert(broken, dst, force=True)
    assert snapshot(dst) == before
    missing = tmp_path / "a" / "b" / "never"
    with pytest.raises(LmforgeError):
        convert(broken, missing)
    assert not (tmp_path / "a").exists()
    assert leftovers(tmp_path) == []


def test_failed_export_leaves_the_destination_untouched(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_export = load_module.export_hf

    def export_then_fail(model, tokenizer, folder):
        real_export(model, tokenizer, folder)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(load_module, "export_hf", export_then_fail)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("keep")
    with pytest.raises(LmforgeError, match="No space left"):
        convert(src, dst, force=True)
    assert snapshot(dst) == {"keep.txt": b"keep"}
    with pytest.raises(LmforgeError, match="No space left"):
        convert(src, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert leftovers(tmp_path) == []


def test_refuses_to_write_over_the_source_or_the_current_folder(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(src)
    with pytest.raises(LmforgeError, match="source itself"):
        convert(src, src, force=True)
    with pytest.raises(LmforgeError, match="source itself"):
        convert(src, str(src) + "/./", force=True)
    with pytest.raises(LmforgeError, match="inside the source"):
        convert(src, src / "sub", force=True)
    with pytest.raises(LmforgeError, match="inside"):
        convert(src, src.parent, force=True)  # the source is inside the destination
    link = tmp_path / "link"
    link.symlink_to(src)
    with pytest.raises(LmforgeError, match="source itself"):
        convert(src, link, force=True)
    with pytest.raises(LmforgeError, match="empty destination"):
        convert(src, "")
    with pytest.raises(LmforgeError, match="empty destination"):
        convert(src, "  ")
    (tmp_path / "work" / "here").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "here")
    with pytest.raises(LmforgeError, match="current folder"):
        convert(src, ".", force=True)
    with pytest.raises(LmforgeError, match="current folder"):
        convert(src, "..", force=True)
    assert snapshot(src) == before
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(LmforgeError, match="is a file"):
        convert(src, file, force=True)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_cli(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "out"
    assert main(["convert", str(src), str(dst)]) == 0
    assert same_weights(src, dst)
    capsys.readouterr()
    assert main(["convert", str(src), str(dst)]) == 2
    assert "not empty" in one_error_line(capsys)
    before = snapshot(src)
    assert main(["convert", str(src), str(src), "--force"]) == 2
    assert "source itself" in one_error_line(capsys)
    assert snapshot(src) == before
    assert main(["convert", str(src), ""]) == 2
    assert "empty destination" in one_error_line(capsys)
    assert main(["convert", str(src), str(dst), "--force"]) == 0
    assert same_weights(src, dst)
