"""Consumers of the team's registry, as the ``reader``: ``mlflow models serve`` of ``@champion``
and ``vae encode --engine spark``; and no credential anywhere it could leak to."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import free_port, models_serve_args, post_json, serving
from tests.team.conftest import TeamProject

pytestmark = [pytest.mark.team, pytest.mark.slow]


def test_models_serve_the_champion_as_the_reader(team_project: TeamProject, tmp_path: Path) -> None:
    port = free_port()
    uri = f"models:/{team_project.model}@champion"
    env = team_project.env("reader")
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    with serving(
        models_serve_args(mlflow_bin, uri, port), f"http://127.0.0.1:{port}/ping", tmp_path, env
    ):
        rows = np.random.default_rng(0).random((3, 784)).round(3).tolist()
        status, body = post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": rows})
    assert status == 200, body
    assert np.asarray(body["predictions"]).shape[0] == 3


@pytest.mark.skipif(shutil.which("java") is None, reason="no Java: `make java` installs it")
def test_spark_encodes_with_the_champion_as_the_reader(
    team_project: TeamProject, tmp_path: Path
) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(images / f"{i}.png")
    uri = f"models:/{team_project.model}@champion"
    env = team_project.env("reader")
    tables = {}
    for engine in ("local", "spark"):
        out = tmp_path / f"{engine}.parquet"
        cmd = [sys.executable, "-m", "vae", "-q", "encode", "--model", uri, str(images)]
        cmd += ["--engine", engine, "--out", str(out)]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        tables[engine] = pd.read_parquet(out).sort_values("source").reset_index(drop=True)
    assert len(tables["spark"]) == 6
    np.testing.assert_allclose(
        tables["spark"].iloc[:, 1:].to_numpy(), tables["local"].iloc[:, 1:].to_numpy(), rtol=1e-5
    )


def test_no_credential_reaches_params_logs_tags_artifacts_or_models(
    team_project: TeamProject,
) -> None:
    """Every secret of the stack, searched for in every object of the MLflow bucket (artifacts
    and models' files), the run's params and tags, every version's tags and description, the
    pipeline's output, the servers' logs and the files git tracks."""
    from vae.mlops.team.services import s3_client

    stack, root = team_project.stack, team_project.root
    secrets = {k: v for k, v in stack.secrets.items() if len(v) >= 12}
    places: dict[str, bytes] = {}
    s3 = s3_client(stack)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow"):
        for obj in page.get("Contents", []):
            places[f"s3://mlflow/{obj['Key']}"] = s3.get_object(Bucket="mlflow", Key=obj["Key"])[
                "Body"
            ].read()
    assert any("/data/vae/" in k for k in places), "no model files in the bucket"

    from tests.team.test_registry import as_user

    run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    with as_user(team_project, "reader") as client:
        run = client.get_run(run_id)
        places["run params"] = json.dumps(run.data.params).encode()
        places["run tags"] = json.dumps(run.data.tags).encode()
        for mv in client.search_model_versions(f"name='{team_project.model}'"):
            places[f"v{mv.version}"] = json.dumps([mv.tags, mv.description, mv.source]).encode()
    places["dvc repro output"] = (root.parent / "repro.log").read_bytes()
    for log in stack.path("logs").glob("*.log"):
        places[str(log)] = log.read_bytes()
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    for name in tracked.stdout.split():
        if (root / name).is_file():
            places[name] = (root / name).read_bytes()
    leaks = [
        (what, where)
        for where, data in places.items()
        for what, secret in secrets.items()
        if secret.encode() in data
    ]
    assert not leaks, leaks
    assert len(places) > 50
