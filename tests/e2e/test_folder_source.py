"""A folder of images as data.source: each file added, removed or changed reruns ingest and
prepare, and the dataset hash moves with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import dvc, make_dvc_project
from tests.e2e.test_pipeline import _env

pytestmark = pytest.mark.slow


def _png(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)


def test_folder_source_changes_rerun_ingest_and_prepare(tmp_path: Path) -> None:
    source = tmp_path / "images"
    for i in range(20):
        _png(source / ("cats" if i % 2 else "dogs") / f"{i}.png", 10 * i)
    params = {"dataset": "folder", "binarize": "none"}
    root = make_dvc_project(tmp_path / "proj", source, data=params)
    hashes = []
    changes = {
        "added": lambda: _png(source / "cats" / "new.png", 255),
        "removed": lambda: (source / "dogs" / "0.png").unlink(),
        "changed": lambda: _png(source / "cats" / "1.png", 77),
    }
    for what, change in [("first", lambda: None), *changes.items()]:
        change()
        if what != "first":
            status = dvc(root, "status", "ingest", env=_env())
            assert "modified" in status and str(source) in status, (what, status)
        out = dvc(root, "repro", "prepare", env=_env())
        assert "Running stage 'ingest'" in out and "Running stage 'prepare'" in out, what
        hashes.append(json.loads((root / "data/prepared/manifest.json").read_text()))
        assert "up to date" in dvc(root, "status", "prepare", env=_env()), what
    assert len({m["dataset_sha256"] for m in hashes}) == 4
    assert [sum(s["count"] for s in m["splits"].values()) for m in hashes] == [20, 21, 20, 20]
