"""MLflow tracking beyond a local store: a real tracking server, one lost mid-run (then
``vae log-run``), one never reachable, and no credentials in logs, tags or params."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import (
    free_port,
    project_env,
    serving,
    start_server,
    stop_server,
    tracking_server_args,
    write_idx_dataset,
)
from tests.mlops.mlflow_helpers import (
    NAME,
    _check_run_and_registry,
    _client,
    make_project,
    run_pipeline,
)
from vae.cli import main

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these


def test_real_tracking_server(tmp_path: Path) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server_dir = tmp_path / "server"
    root = make_project(tmp_path / "proj")
    with serving(
        tracking_server_args(port, server_dir), f"{uri}/health", server_dir, dict(os.environ)
    ):
        run_pipeline(root, uri)
        _check_run_and_registry(root, uri)
    assert not (root / "mlruns").exists() and not (root / "mlflow.db").exists()


def test_server_gone_mid_run_then_relog(tmp_path: Path) -> None:
    """Training outlives the tracking server, says so, and `vae log-run` re-logs later."""
    from tests.conftest import write_params

    server_dir = tmp_path / "server"
    root = make_project(tmp_path / "proj")
    write_idx_dataset(root / "data" / "raw", n_train=1500, n_test=50)
    write_params(
        root / "params.yaml",
        train={"epochs": 10, "batch_size": 8},
        mlflow={"enabled": True, "experiment": "tiny", "registered_model": NAME},
    )
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    vae = [sys.executable, "-m", "vae", "-q"]
    assert subprocess.run([*vae, "prepare"], cwd=root, env=env).returncode == 0
    server = start_server(
        tracking_server_args(port, server_dir), f"{uri}/health", server_dir, dict(os.environ)
    )
    proc = subprocess.Popen([*vae, "train"], cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    try:
        ckpt = root / "models" / "checkpoint.pt"
        deadline = time.time() + 120
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        stop_server(server)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "vae log-run" in err and "local outputs are complete" in err
    assert json.loads((root / "metrics/train.json").read_text())["epochs"] == 10
    assert torch.load(root / "models/model.pt", weights_only=True)["epoch"] >= 1

    port = free_port()  # the server is back (same store, new port): re-log
    uri = f"http://127.0.0.1:{port}"
    with serving(
        tracking_server_args(port, server_dir), f"{uri}/health", server_dir, dict(os.environ)
    ):
        out = subprocess.run(
            [*vae, "log-run"],
            cwd=root,
            capture_output=True,
            text=True,
            env={**env, "MLFLOW_TRACKING_URI": uri},
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
        client = _client(uri)
        history = client.get_metric_history(run_id, "val_nelbo")
        assert sorted({m.step for m in history}) == list(range(1, 11))
        assert client.get_run(run_id).info.status == "FINISHED"


def test_unreachable_server_fails_fast(project: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.conftest import write_params

    write_params(project / "params.yaml", mlflow={"enabled": True})
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["-q", "prepare"]) == 0
    with project_env(project, uri):
        start = time.time()
        assert main(["-q", "train"]) == 75  # EX_TEMPFAIL: a later retry may work
        assert time.time() - start < 15
    err = capsys.readouterr().err
    assert uri in err and "unreachable" in err
    assert not (project / "models" / "checkpoint.pt").exists()


def test_credentials_never_reach_logs_or_tags() -> None:
    from vae.mlops.pipeline_run import redact

    assert redact("https://alice:s3cret@mlflow.example.com") == (
        "https://alice:***@mlflow.example.com"
    )
    assert redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    text = json.dumps(params).lower()
    assert not any(word in text for word in ("password", "token", "secret"))
