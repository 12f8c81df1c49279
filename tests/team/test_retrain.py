"""``vae-retrain`` against the team's servers: a third machine's clone gets new data, and the
flow, run on the team's Prefect server, retrains, registers in the team's MLflow and leaves
its artifacts in the object store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import dvc, run, write_idx_dataset
from tests.team.conftest import TeamProject, clone

pytestmark = [pytest.mark.team, pytest.mark.slow]

FLOW = (
    "import json, sys; from pipelines.flows import vae_retrain\n"
    "json.dump(vae_retrain(root='.'), open(sys.argv[1], 'w'))\n"
)


def test_vae_retrain_on_new_data_runs_on_the_team_servers(
    team_project: TeamProject, tmp_path: Path
) -> None:
    c = clone(team_project, tmp_path / "c")
    env = team_project.env(
        "writer", PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false"
    )
    dvc(c, "pull", env=env)
    params = yaml.safe_load((c / "params.yaml").read_text())
    params["data"]["source"] = str(write_idx_dataset(tmp_path / "raw-c", n_train=260))
    (c / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(c, "git", "commit", "-qam", "more training data")

    result_file = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-c", FLOW, str(result_file)],
        cwd=c,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["status"] in ("promoted", "kept"), result
    assert result["stages"]["train"] and result["stages"]["register"], result
    assert result["run_id"]

    api = team_project.stack.prefect_url
    body = {"flows": {"name": {"any_": ["vae-retrain"]}}}
    runs = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30).json()
    assert any(r["state_type"] == "COMPLETED" for r in runs), runs  # on the team's server
    (flow_run,) = [r for r in runs if r["state_type"] == "COMPLETED"][-1:]
    body = {"artifacts": {"key": {"any_": ["vae-retrain-samples"]}}}
    (image,) = httpx.post(f"{api}/artifacts/filter", json=body, timeout=30).json()
    assert image["type"] == "image" and image["flow_run_id"] == flow_run["id"]
    auth = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    png = httpx.get(image["data"], auth=auth, timeout=30)
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n", image["data"]

    from vae.mlops.team.services import s3_client

    pages = s3_client(team_project.stack).get_paginator("list_objects_v2")
    keys = [o["Key"] for page in pages.paginate(Bucket="mlflow") for o in page.get("Contents", [])]
    assert any(f"/{result['run_id']}/artifacts/" in k for k in keys)
