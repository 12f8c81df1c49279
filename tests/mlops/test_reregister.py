"""``vae reregister``: a version logged before models shipped their code is logged again,
self-contained, with its tags; aliases follow, and an unknown version is a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_vae
from tests.mlops.mlflow_helpers import _client

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these


def test_reregister_makes_an_old_version_self_contained(tmp_path: Path) -> None:
    """A version logged the old way (no code/) is logged again with its code; aliases follow."""
    import mlflow

    from vae.pyfunc import save_vae_dir

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = _client(uri)
    model = tiny_vae(3, 8)
    run_id = client.create_run(client.create_experiment("old")).info.run_id
    mlflow.set_tracking_uri(uri)
    save_vae_dir(model, tmp_path / "vae")
    with mlflow.start_run(run_id=run_id):  # the format before models shipped their code
        info = mlflow.pyfunc.log_model(
            name="model", loader_module="vae.pyfunc", data_path=str(tmp_path / "vae")
        )
    mlflow.register_model(info.model_uri, "old-vae")
    client.set_model_version_tag("old-vae", "1", "nll_iw", "123.5")
    client.set_registered_model_alias("old-vae", "champion", "1")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "vae", "reregister", "--model", "models:/old-vae@champion"]
    out = subprocess.run(
        [*cmd, "--tracking-uri", uri], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["from_version"] == 1 and result["version"] == 2
    new = client.get_model_version_by_alias("old-vae", "champion")
    assert str(new.version) == "2" and new.run_id == run_id
    assert new.tags["reregistered_from"] == "1" and new.tags["nll_iw"] == "123.5"
    assert "Test nll_iw: 123.50 nats" in new.description
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/old-vae/2"))
    from vae.mlops.packaging import shipped_files

    code = local / "code" / "vae"
    shipped = sorted(str(p.relative_to(code)) for p in code.rglob("*.py"))
    assert shipped == shipped_files() and "core/model.py" in shipped
    loaded = mlflow.pyfunc.load_model("models:/old-vae@champion")
    x = np.random.default_rng(0).random((4, 784), dtype=np.float32)
    with torch.no_grad():
        expected = model.encode(torch.from_numpy(x).reshape(4, 1, 28, 28)).mean.numpy()
    np.testing.assert_allclose(loaded.predict(x), expected, rtol=1e-5, atol=1e-6)
    # an unknown version is one line, exit 1
    out = subprocess.run(
        [sys.executable, "-m", "vae", "reregister", "--model", "models:/old-vae/9"],
        cwd=elsewhere,
        env={**env, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "models:/old-vae/9" in out.stderr
