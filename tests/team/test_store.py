"""The team's store as a team meets it: every service on 127.0.0.1, the pipeline's artifacts in
the object store, a second clone that pulls everything and has nothing left to run, and three
MLflow users (reader, writer, none) who can do what their role allows and no more."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import dvc, run
from tests.team.conftest import TeamProject, clone

pytestmark = [pytest.mark.team, pytest.mark.slow]


def _tree(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo += children.get(p, [])
    return found


def test_every_listener_is_on_loopback(team_stack) -> None:
    from vae.mlops.team.__main__ import service_pid
    from vae.mlops.team.services import SERVICES

    pids: set[int] = set()
    for name in SERVICES:
        pid = service_pid(team_stack, name)
        assert pid, f"{name} is not running"
        pids |= _tree(pid)
    listeners = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    ours = [
        line
        for line in listeners.splitlines()
        if any(int(p) in pids for p in re.findall(r"pid=(\d+)", line))
    ]
    local = {line.split()[3] for line in ours}
    assert local, listeners
    assert all(address.startswith("127.0.0.1:") for address in local), ours
    expected = {f"127.0.0.1:{port}" for port in team_stack.ports.values()}
    assert local == expected, (local ^ expected, ours)


def test_the_pipeline_keeps_its_artifacts_in_the_object_store(team_project: TeamProject) -> None:
    from vae.mlops.team.services import s3_client

    root, stack = team_project.root, team_project.stack
    run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    keys = {
        obj["Key"]
        for page in s3_client(stack).get_paginator("list_objects_v2").paginate(Bucket="mlflow")
        for obj in page.get("Contents", [])
    }
    ran = {k.split(f"/{run_id}/artifacts/", 1)[1] for k in keys if f"/{run_id}/artifacts/" in k}
    for path in ("train/train.csv", "evaluate/eval.json", "generate/samples.png"):
        assert path in ran, sorted(ran)
    models = [k for k in keys if k.endswith("/data/vae/vae.json")]
    assert models, "no registered model's files in s3://mlflow"
    for local in ("mlruns", "mlartifacts", "mlflow.db"):
        assert not (root / local).exists(), local
        assert not stack.path("mlflow", local).exists(), local
    decision = json.loads((root / "metrics/registry.json").read_text())
    assert decision["registered"] and decision["name"] == team_project.model


def test_a_second_clone_pulls_everything_and_has_nothing_to_run(
    team_project: TeamProject, tmp_path: Path
) -> None:
    """Clone B has no raw dataset on its disk (a second machine has no Debian package)."""
    env = team_project.env("writer")
    b = clone(team_project, tmp_path / "b")
    hidden = team_project.raw.with_name("raw-a.away")
    team_project.raw.rename(hidden)
    try:
        out = dvc(b, "pull", env=env)
        assert "failed" not in out.lower(), out
        print(f"clone B, no raw data on disk: dvc pull\n{out.strip()[-400:]}")
        for path in ("data/raw", "data/prepared/manifest.json", "models/model.pt"):
            assert (b / path).exists(), path
        a_model = (team_project.root / "models/model.pt").read_bytes()
        assert (b / "models/model.pt").read_bytes() == a_model
        out = dvc(b, "repro", "--allow-missing", env=env)
        assert "Running stage" not in out, out
        print(f"clone B: dvc repro --allow-missing\n{out.strip()[-400:]}")
        assert not list(b.glob("mlruns")), "B ran something"
        status = run(b, "git", "status", "--porcelain")
        assert status.strip() == "", status
    finally:
        hidden.rename(team_project.raw)


def _vae(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vae", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_reader_loads_the_champion_and_cannot_move_it(
    team_project: TeamProject, tmp_path: Path
) -> None:
    from mlflow.exceptions import MlflowException

    from tests.conftest import project_env
    from vae.mlops import store

    uri = f"models:/{team_project.model}@champion"
    images = next((team_project.raw).glob("t10k-images*"))
    proc = _vae(tmp_path, team_project.env("reader"), "encode", "--model", uri, str(images))
    assert proc.returncode == 2, proc.stderr  # --out is required: the argument check first
    out = tmp_path / "codes.parquet"
    reader = team_project.env("reader")
    proc = _vae(tmp_path, reader, "encode", "--model", uri, str(images), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0

    with project_env(tmp_path, reader["MLFLOW_TRACKING_URI"]), pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", "reader")
        mp.setenv("MLFLOW_TRACKING_PASSWORD", reader["MLFLOW_TRACKING_PASSWORD"])
        client = store.client()
        before = client.get_model_version_by_alias(team_project.model, "champion").version
        with pytest.raises(MlflowException) as refused:
            client.set_registered_model_alias(team_project.model, "champion", "1")
        assert refused.value.error_code == "PERMISSION_DENIED"
        after = client.get_model_version_by_alias(team_project.model, "champion").version
        assert after == before

    nobody = _vae(
        tmp_path, team_project.env("none"), "encode", "--model", uri, str(images), "--out", str(out)
    )
    assert nobody.returncode == 1, nobody.stderr
    lines = nobody.stderr.strip().splitlines()
    assert len(lines) == 1 and "not authenticated" in lines[0], nobody.stderr
    assert "Traceback" not in nobody.stderr
