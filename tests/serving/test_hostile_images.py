"""Hostile and oversized images in `vae encode` and `vae reconstruct`: one line naming the file,
exit 1, nothing decoded past the header, and the earlier output kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.data import hostile_images as hostile
from vae.cli import main

CASES = {
    **hostile.CASES,
    "tall.jpg": (lambda: hostile.lying_jpeg(28, 56), "image is 28x56, the model expects 28x28"),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A logged 28x28 model folder (the pre-move test model: any local model folder will do)."""
    dest = tmp_path_factory.mktemp("model") / "model"
    shutil.copytree(REPO / "tests" / "fixtures" / "pre_move_model" / "model", dest)
    return str(dest)


def _folder(root: Path, name: str, data: bytes) -> Path:
    folder = root / "images"
    folder.mkdir()
    (folder / "a_good.png").write_bytes(hostile.good_png(10))
    (folder / name).write_bytes(data)
    (folder / "z_good.png").write_bytes(hostile.good_png(200))
    return folder


@pytest.mark.parametrize("name", sorted(CASES))
def test_encode_refuses_in_one_line_and_keeps_the_output(
    name: str, model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make, message = CASES[name]
    folder = _folder(tmp_path, name, make())
    out = tmp_path / "e.parquet"
    out.write_bytes(b"the earlier output")
    given = [str(folder / name)] if name.endswith(".gif") else [str(folder)]  # folders: PNG/JPEG
    assert main(["-q", "encode", "--model", model, *given, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"vae encode: error: {folder / name}: ") and message in err, err
    assert out.read_bytes() == b"the earlier output"


def test_reconstruct_refuses_a_bomb_too(model: str, tmp_path: Path, capsys) -> None:
    folder = _folder(tmp_path, "bomb.png", hostile.header_only_png(20000, 20000))
    out = tmp_path / "r.png"
    assert main(["-q", "reconstruct", "--model", model, str(folder), "--out", str(out)]) == 1
    assert "bomb.png: the header declares 400,000,000 pixels" in capsys.readouterr().err
    assert not out.exists()


def test_max_pixels_is_the_limit(model: str, tmp_path: Path, capsys) -> None:
    """The option sets the limit, not PIL's global threshold: 784 pixels over a limit of 700."""
    folder = _folder(tmp_path, "m_good.png", hostile.good_png(50))
    out = str(tmp_path / "e.parquet")
    args = ["-q", "encode", "--model", model, str(folder), "--out", out]
    assert main([*args, "--max-pixels", "700"]) == 1
    err = capsys.readouterr().err
    assert "a_good.png: the header declares 28x28 = 784 pixels, over the limit of 700" in err
    assert "(--max-pixels); not decoded" in err
    assert main([*args, "--max-pixels", "784"]) == 0 and Path(out).is_file()
