"""A version registered before vae/ was grouped into rooms still loads and predicts in a process
that already imported today's package: MLflow only prepends the model's ``code/`` to
``sys.path``, so the imported ``vae`` wins, and today's ``vae.pyfunc`` must read the old files.
(From a fresh venv, where the old model runs its own code: tests/e2e/test_fresh_venv_consumer.py.)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

OLD = REPO / "tests" / "fixtures" / "pre_move_model"
MODES = {
    "encode": ({}, slice(None)),
    "reconstruct": ({"mode": "reconstruct"}, slice(None)),
    "generate": ({"mode": "generate", "n": 3, "seed": 0}, slice(0, 1)),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_an_old_version_predicts_with_todays_package(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    import vae.pyfunc

    monkeypatch.setattr(sys, "path", list(sys.path))  # MLflow prepends the model's code/
    model = shutil.copytree(OLD / "model", tmp_path / "model")
    loaded = mlflow.pyfunc.load_model(str(model))
    assert sys.modules["vae.pyfunc"] is vae.pyfunc  # today's loader read the old files
    assert Path(vae.pyfunc.__file__).is_relative_to(REPO / "vae")
    params, rows = MODES[mode]
    got = loaded.predict(np.load(OLD / "x.npy")[rows], params=params or None)
    np.testing.assert_allclose(got, np.load(OLD / f"{mode}.npy"), rtol=1e-5, atol=1e-6)
