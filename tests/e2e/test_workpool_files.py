"""The team's deployment files, read as Prefect reads them (no server): prefect.yaml's steps and
triggers, the automations file, and the build step's check that HEAD was pushed."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run


@pytest.fixture(scope="module", autouse=True)
def _prefect_env(prefect_env: None) -> None:
    """Prefect reads its settings on import: a tmp PREFECT_HOME, analytics off."""


def _config() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_pull_steps_clone_the_built_commit_then_ready_and_pull_in_the_clone() -> None:
    config = _config()
    built = [next(iter(step.values())).get("id") for step in config["build"]]
    assert built == ["pushed", "commit", "origin"]
    (clone, *rest) = [next(iter(step.items())) for step in config["pull"]]
    assert clone[0] == "prefect.deployments.steps.git_clone"
    assert clone[1]["repository"] == "{{ origin.stdout }}"
    assert clone[1]["commit_sha"] == "{{ commit.stdout }}"
    scripts = [args.get("script") for _, args in rest]
    assert scripts == ["python -m pipelines.worker ready", "python -m dvc pull --quiet", None]
    assert all(args["directory"] == "{{ clone.directory }}" for _, args in rest)


def test_each_deployment_runs_once_at_a_time_and_reruns_its_own_crashes() -> None:
    from prefect.cli.deploy._triggers import DeploymentTriggerAdapter  # what prefect deploy uses

    from pipelines.workpool import AUTOMATIONS, load_automations

    flows = {"on-demand": "vae-pipeline", "scheduled": "vae-retrain"}
    for deployment in _config()["deployments"]:
        assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
        (spec,) = deployment["triggers"]
        trigger = DeploymentTriggerAdapter.validate_python(dict(spec))
        assert trigger.expect == {"prefect.flow-run.Crashed"}
        zombie = load_automations(AUTOMATIONS, None)[0].actions[0].message
        assert fnmatch.fnmatchcase(zombie, spec["match"]["prefect.state-message"])
        related = {
            (r["prefect.resource.role"], r["prefect.resource.name"]) for r in spec["match_related"]
        }
        name = deployment["name"]
        assert related == {("flow", flows[name]), ("deployment", name)}


def test_the_automations_file_validates_with_and_without_a_webhook() -> None:
    from pipelines.workpool import AUTOMATIONS, NOTIFY_AUTOMATION, load_automations

    block = uuid.uuid4()
    zombie, notify = load_automations(AUTOMATIONS, block)
    assert zombie.trigger.within.total_seconds() == 90
    assert zombie.actions[0].type == "change-flow-run-state"
    assert notify.name == NOTIFY_AUTOMATION
    assert notify.actions[0].block_document_id == block
    assert notify.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert [a.name for a in load_automations(AUTOMATIONS, None)] == [zombie.name]


def _repo_with_origin(tmp_path: Path) -> Path:
    origin, work = tmp_path / "origin.git", tmp_path / "work"
    run(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    run(tmp_path, "git", "clone", "-q", str(origin), str(work))
    (work / "a.txt").write_text("a\n")
    run(work, "git", "add", "a.txt")
    run(work, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "a")
    run(work, "git", "push", "-q", "-u", "origin", "main")
    return work


def test_pushed_passes_on_a_pushed_head_and_names_an_unpushed_one(tmp_path: Path) -> None:
    work = _repo_with_origin(tmp_path)
    cmd = [sys.executable, "-m", "pipelines.worker", "pushed", "--root", str(work)]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    head = subprocess.run(["git", "-C", str(work), "rev-parse", "HEAD"], capture_output=True)
    assert ok.returncode == 0 and ok.stdout.strip() == head.stdout.decode().strip(), ok.stderr
    (work / "b.txt").write_text("b\n")
    run(work, "git", "add", "b.txt")
    run(work, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "b")
    late = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert late.returncode == 1
    (line,) = late.stderr.strip().splitlines()
    assert line.startswith("pipelines.worker pushed: error: commit ")
    assert line.endswith("is not on origin/main: the workers clone from there; git push first")


def test_ready_refuses_a_lock_this_environment_does_not_match_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "vae"\ndependencies = ["numpy"]\n')
    (tmp_path / "requirements.lock").write_text("numpy==0.0.1\n")
    cmd = [sys.executable, "-m", "pipelines.worker", "ready", "--root", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT__FLOW_RUN_ID"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        f"pipelines.worker ready: error: requirements.lock differs from the environment at "
        f"{sys.prefix}: numpy 0.0.1 (installed "
    )
    assert not (tmp_path / "vae.egg-info").exists()  # nothing installed


def test_the_worker_sends_heartbeats_and_runs_this_environment_first() -> None:
    from pipelines.worker import HEARTBEAT_SECONDS, worker_env

    env = worker_env({"PATH": "/usr/bin"})
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_SECONDS) == "30"
    assert env["PATH"] == f"{Path(sys.executable).parent}:/usr/bin"
