"""Hostile and oversized images in a folder source (`vae ingest`, `vae prepare`): one line naming
the file, exit 1, nothing decoded past the header, and data/raw as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_params
from tests.data import hostile_images as hostile
from vae.cli import main
from vae.data.raw import read_source
from vae.data.splits import DataError

CASES = {
    **hostile.CASES,
    "truncated.png": (
        lambda: hostile.good_png()[:50],
        "cannot read the image (image file is truncated",
    ),
}


def _source(root: Path, name: str, data: bytes) -> Path:
    for label in ("shirt", "shoe"):
        (root / "src" / label).mkdir(parents=True)
        for i in range(3):
            (root / "src" / label / f"{i}.png").write_bytes(hostile.good_png(40 * i + 10))
    (root / "src" / "shoe" / name).write_bytes(data)
    return root / "src"


@pytest.mark.parametrize("name", sorted(CASES))
def test_read_source_names_the_file(name: str, tmp_path: Path) -> None:
    make, message = CASES[name]
    src = _source(tmp_path, name, make())
    with pytest.raises(DataError) as info:
        read_source("folder", src)
    assert str(info.value).startswith(f"{src / 'shoe' / name}: ") and message in str(info.value)


@pytest.mark.parametrize("name", ["bomb.png", "animated.gif"])
def test_ingest_exits_1_in_one_line_and_keeps_data_raw(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    make, message = CASES[name]
    src = _source(tmp_path, name, make())
    write_params(tmp_path / "params.yaml", data={"dataset": "folder", "source": str(src)})
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "kept.png").write_bytes(b"the earlier copy")
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "ingest"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and name in err, err
    assert [p.name for p in (tmp_path / "data" / "raw").iterdir()] == ["kept.png"]


def test_data_max_image_pixels_is_the_limit(tmp_path: Path) -> None:
    src = _source(tmp_path, "extra.png", hostile.good_png())
    with pytest.raises(DataError, match=r"28x28 = 784 pixels, over the limit of 700 \(data\.max"):
        read_source("folder", src, max_pixels=700)
    assert len(read_source("folder", src, max_pixels=784).splits["all"]) == 7
