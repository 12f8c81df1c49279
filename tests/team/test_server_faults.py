"""A tracking server started wrongly, as its users meet it: a wrong database password stops
the start command with PostgreSQL's reason; wrong S3 keys make ``vae register`` fail in one
retryable line, leaving the champion where it was."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.team.conftest import TeamProject

pytestmark = [pytest.mark.team, pytest.mark.slow]


def _variant(stack, **secrets: str):
    """``stack`` with its own MLflow port and state folder, and some secrets changed."""
    from vae.mlops.team.state import free_port

    state = Path(tempfile.mkdtemp(prefix="vae-team-variant-", dir="/tmp"))
    ports = {**stack.ports, "mlflow": free_port()}
    secrets = {**stack.secrets, **secrets}
    return dataclasses.replace(stack, state=state, ports=ports, secrets=secrets)


@pytest.fixture
def stopped_after() -> Iterator[list]:
    started: list = []
    yield started
    from vae.mlops.team.services import stop_service

    for stack in started:
        stop_service(stack, "mlflow")


def test_a_wrong_database_password_stops_the_start_at_once_with_postgres_reason(
    team_stack, stopped_after: list
) -> None:
    from vae.mlops.team.procs import ServiceError
    from vae.mlops.team.services import start_service

    wrong = _variant(team_stack, pg_mlflow="not-the-password")
    stopped_after.append(wrong)
    with pytest.raises(ServiceError) as info:
        start_service(wrong, "mlflow")
    message = str(info.value)
    print(message)
    port = team_stack.ports["postgres"]
    assert message == (
        f"the MLflow server: PostgreSQL at 127.0.0.1:{port} refuses mlflow on database mlflow: "
        'FATAL:  password authentication failed for user "mlflow"'
    )
    assert not wrong.path("logs", "mlflow.log").exists()  # refused before it started
    assert "not-the-password" not in message and team_stack.secrets["pg_mlflow"] not in message


def test_wrong_s3_keys_on_the_server_fail_register_in_one_retryable_line(
    team_project: TeamProject, stopped_after: list
) -> None:
    from vae.mlops.team.services import start_service

    stack = team_project.stack
    wrong = _variant(stack, s3_secret="not-the-secret-key-of-the-store")
    stopped_after.append(wrong)
    start_service(wrong, "mlflow")  # it starts: S3 is first used by an upload
    root = team_project.root
    before = _champion(team_project)
    env = {**team_project.env("writer"), "MLFLOW_TRACKING_URI": wrong.mlflow_url}
    proc = subprocess.run(
        [sys.executable, "-m", "vae", "register"], cwd=root, env=env, capture_output=True, text=True
    )
    print(proc.stderr)
    assert proc.returncode == 75, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("vae register: error: registering ") and errors[0].endswith(
        "; try again"
    ), errors[0]
    assert _champion(team_project) == before
    json.loads((root / "metrics" / "registry.json").read_text())  # the last good record stays


def _champion(project: TeamProject) -> str:
    import os

    from mlflow import MlflowClient

    client = MlflowClient(project.stack.mlflow_url)
    saved = dict(os.environ)
    os.environ.update(project.stack.client_env("reader"))
    try:
        return client.get_model_version_by_alias(project.model, "champion").version
    finally:
        os.environ.clear()
        os.environ.update(saved)
