"""The team stack for the ``team`` tests: started once per pytest run, stopped at its end.

``team_stack`` brings up PostgreSQL, the object store, MLflow (basic-auth) and Prefect with the
project's own ``vae.mlops.team`` (what ``make team-up`` runs), in a fresh state folder under
/tmp (the ``postgres`` user must be able to traverse it). ``team_project`` is the one tiny
pipeline every team test reuses: clone A, trained by ``dvc repro`` as the ``writer`` user against
the stack, with its data pushed to the S3 remote. Tests namespace what they create (experiment,
registered model, remote prefix) by a random suffix, so they share one stack.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import dvc, make_dvc_project, run, subprocess_env, write_idx_dataset


@dataclass(frozen=True)
class TeamProject:
    stack: object  # vae.mlops.team.state.Stack
    root: Path  # clone A
    raw: Path  # clone A's data.source (a second machine does not have it)
    remote: str  # the DVC remote's URL
    model: str  # the registered model
    experiment: str

    def env(self, role: str = "writer", **extra: str) -> dict[str, str]:
        """A subprocess environment as MLflow user ``role`` (``none``: no credentials), with
        the retry limits of ``env/s3.env`` (the S3 keys are in each clone's config.local)."""
        retries = {k: v for k, v in self.stack.dvc_env().items() if "_KEY" not in k}
        if role == "none":
            env = subprocess_env(**self.stack.client_env("reader"), **retries, **extra)
            env.pop("MLFLOW_TRACKING_USERNAME")
            env.pop("MLFLOW_TRACKING_PASSWORD")
            return env
        return subprocess_env(**self.stack.client_env(role), **retries, **extra)


@pytest.fixture(scope="session")
def team_stack() -> Iterator[object]:
    """A fresh stack for this run; ``VAE_TEST_TEAM_STATE=DIR``: that one, left running after."""
    from vae.mlops.team.__main__ import down, up

    kept = os.environ.get("VAE_TEST_TEAM_STATE")
    state = Path(kept or tempfile.mkdtemp(prefix="vae-team-", dir="/tmp"))
    try:
        yield up(state)
    finally:
        if not kept:
            down(state)
            shutil.rmtree(state, ignore_errors=True)


def add_s3_remote(root: Path, stack: object, url: str, env: dict[str, str]) -> None:
    """The team's DVC remote in ``root``: the URL and endpoint committed, the keys local."""
    dvc(root, "remote", "add", "-f", "-d", "team", url, env=env)
    dvc(root, "remote", "modify", "team", "endpointurl", stack.s3_url, env=env)
    dvc(root, "remote", "modify", "team", "connect_timeout", "5", env=env)
    dvc(root, "remote", "modify", "team", "read_timeout", "30", env=env)
    add_s3_keys(root, stack, env)


def add_s3_keys(root: Path, stack: object, env: dict[str, str]) -> None:
    keys = stack.s3_env()
    for name, key in (
        ("access_key_id", "AWS_ACCESS_KEY_ID"),
        ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
    ):
        dvc(root, "remote", "modify", "--local", "team", name, keys[key], env=env)


def start_register(root: Path, env: dict[str, str]) -> subprocess.Popen:
    """A real ``vae register`` in ``root``, its output kept."""
    return subprocess.Popen(
        [sys.executable, "-m", "vae", "register"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="session")
def team_project(team_stack: object, tmp_path_factory: pytest.TempPathFactory) -> TeamProject:
    ns = uuid.uuid4().hex[:8]
    base = tmp_path_factory.mktemp("team")
    raw = write_idx_dataset(base / "raw-a")
    model, experiment = f"team-vae-{ns}", f"team-{ns}"
    mlflow = {"enabled": True, "experiment": experiment, "registered_model": model}
    root = make_dvc_project(base / "a", raw, mlflow=mlflow)
    project = TeamProject(team_stack, root, raw, f"s3://dvc/{ns}", model, experiment)
    env = project.env("writer")
    add_s3_remote(root, team_stack, project.remote, env)
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "the team's remote")
    (base / "repro.log").write_text(dvc(root, "repro", env=env))  # the leak test reads it
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "trained")
    dvc(root, "push", env=env)
    return project


def clone(project: TeamProject, dest: Path) -> Path:
    """A second machine's checkout: ``git clone`` of A, the S3 keys in its own config.local."""
    subprocess.run(["git", "clone", "-q", str(project.root), str(dest)], check=True)
    add_s3_keys(dest, project.stack, project.env("writer"))
    return dest


def process_tree(pids: list[int]) -> set[int]:
    """``pids`` and every process they started, that still run."""
    found = set()
    for pid in pids:
        try:
            top = psutil.Process(pid)
            found |= {top.pid, *(p.pid for p in top.children(recursive=True))}
        except psutil.Error:
            pass
    return found


def outside_loopback(pids: set[int]) -> list[str]:
    """``ss -tnp`` connections of ``pids`` with an end outside 127.0.0.0/8."""
    lines = subprocess.run(["ss", "-Htnp"], capture_output=True, text=True).stdout.splitlines()
    bad = []
    for line in lines:
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if not owners & pids:
            continue
        for end in line.split()[3:5]:
            host = end.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
            if not ipaddress.ip_address(host).is_loopback:
                bad.append(line)
    return bad
