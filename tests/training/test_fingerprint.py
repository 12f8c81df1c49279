"""The resume fingerprint: the modules that importing the training module runs, found by the
import walker, hashed without docstrings; the callbacks (log line, progress bar) stay out."""

from __future__ import annotations

import shutil
from pathlib import Path

from vae.imports import ROOT
from vae.training.checkpoint import code_fingerprint, fingerprinted_modules


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "vae"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_the_walk_covers_the_model_and_the_loop_and_not_the_callbacks() -> None:
    found = set(fingerprinted_modules())
    # everything the hand-kept list of before the move named (it once missed layers and resnet)
    named = ["core.model", "core.layers", "core.resnet", "core.hierarchy", "core.losses"]
    named += ["core.distributions", "data.splits", "training.ema", "training.numerics"]
    assert {f"vae.{m}" for m in named} | {"vae.training.train", "vae.config"} <= found
    assert "vae.training.callbacks" not in found
    assert not any(m.startswith(("vae.mlops", "vae.evaluation", "vae.serving")) for m in found)


def test_log_line_progress_bar_and_docstring_edits_keep_the_fingerprint(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    before = code_fingerprint(root)
    assert before == code_fingerprint()  # a copy of the same code: the same hash
    _edit(root / "training" / "callbacks.py", "log.info(", "log.warning(")
    _edit(root / "training" / "callbacks.py", "leave=False", "leave=True")
    _edit(root / "core" / "losses.py", '"""', '"""Reworded. ')
    assert code_fingerprint(root) == before


def test_a_change_of_behaviour_or_a_new_module_changes_it(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    before = code_fingerprint(root)
    _edit(root / "training" / "train.py", "return lr * 0.5 *", "return lr * 0.25 *")
    assert code_fingerprint(root) != before
    root = _copy(tmp_path / "again")
    (root / "training" / "noise.py").write_text("SCALE = 1.0\n")
    _edit(
        root / "training" / "train.py",
        "import torch\n",
        "import torch\n\nimport vae.training.noise\n",
    )
    assert "vae.training.noise" in fingerprinted_modules(root)
    assert code_fingerprint(root) != before
