"""Prefect workers on two machines, as an ops team runs them: ``python -m pipelines.workpool up``
deploys ``prefect.yaml`` (pool, automations, deployments) from a developer's clone; each machine
runs ``python -m pipelines.worker start``, and every flow run clones the deployed commit,
installs it into its machine's environment and pulls its data from the team's DVC remote.

The machines are two folders on this host, each with its own virtual environment (over this
one's packages: the pinned stack a machine installs once) and its own temporary folder.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import REPO, run
from tests.team.conftest import TeamProject, add_s3_keys
from tests.team.workers import (
    Api,
    Machine,
    Receiver,
    code_line,
    make_machine,
    start_worker,
    stop_worker,
    which_machine,
)

pytestmark = [pytest.mark.team, pytest.mark.slow]

PROJECT_FILES = ("pipelines", "pyproject.toml", "requirements.lock", "README.md", "prefect.yaml")
RETRAIN, PIPELINE = "vae-retrain/scheduled", "vae-pipeline/on-demand"


@dataclass
class Workers:
    project: TeamProject
    dev: Path  # the developer's clone that deployed
    model: str
    machines: list[Machine]
    api: Api
    receiver: Receiver
    deploy_log: str


def _dev_clone(project: TeamProject, base: Path) -> tuple[Path, str]:
    """Clone A with the whole project (flows, prefect.yaml, the lock), its own model name, and
    an origin the workers clone from; pushed."""
    dev = base / "dev"
    run(base, "git", "clone", "-q", str(project.root), str(dev))
    add_s3_keys(dev, project.stack, project.env("writer"))
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dev / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dev / name)
    params = yaml.safe_load((dev / "params.yaml").read_text())
    model = f"{project.model}-workers"
    params["mlflow"]["registered_model"] = model
    (dev / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(dev, "git", "add", "-A")
    run(dev, "git", "commit", "-qm", "the flows and their deployments")
    origin = base / "origin.git"
    run(base, "git", "clone", "-q", "--bare", str(dev), str(origin))
    run(dev, "git", "remote", "set-url", "origin", str(origin))
    run(dev, "git", "fetch", "-q", "origin")
    run(dev, "git", "branch", "-q", "-u", "origin/main")
    return dev, model


@pytest.fixture(scope="module")
def workers(team_project: TeamProject, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    base = tmp_path_factory.mktemp("workers")
    dev, model = _dev_clone(team_project, base)
    receiver = Receiver().start()
    env = team_project.env("writer", PREFECT_HOME=str(base / "prefect-dev"))
    env.update({k: v for k, v in team_project.stack.dvc_env().items()})  # the workers' dvc pull
    up = _workpool_up(dev, env, "--notify-url", receiver.url)
    machines = [make_machine(base / name, name, dev) for name in ("machine-1", "machine-2")]
    for machine in machines:
        start_worker(machine, env)
    api = Api(team_project.stack.prefect_url)
    try:
        yield Workers(team_project, dev, model, machines, api, receiver, up)
    finally:
        for machine in machines:
            stop_worker(machine)
        receiver.stop()


def _workpool_up(dev: Path, env: dict[str, str], *args: str) -> str:
    """``python -m pipelines.workpool up`` in the developer's clone; its output."""
    up = subprocess.run(
        [sys.executable, "-m", "pipelines.workpool", "up", *args],
        cwd=dev,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    return up.stdout + up.stderr


def _holds(api: Api, run_id: str) -> tuple[str, str]:
    """When the run held the model's retraining lock (ISO timestamps of the two log lines)."""
    lines = api.logs(run_id)
    took = [ln.split()[0] for ln in lines if "holding the retraining lock" in ln]
    left = [ln.split()[0] for ln in lines if "released the retraining lock" in ln]
    assert len(took) == len(left) == 1, lines[-30:]
    return took[0], left[0]


def test_two_workers_run_both_flows_each_from_its_own_clone(workers: Workers) -> None:
    api, machines = workers.api, workers.machines
    print(workers.deploy_log)
    time.sleep(5)  # both workers polling
    print("idle workers:", ", ".join(f"{m.name} {m.rss_mib():.0f} MiB" for m in machines))
    runs = [
        api.run(RETRAIN, force=True, epochs=2),  # an experiment: trains and registers
        api.run(PIPELINE),  # the other deployment: waits for the model's lock
        api.run(RETRAIN, force=True, epochs=3),  # the same deployment: enqueued by its limit
    ]
    ids = [r["id"] for r in runs]
    peak: dict[str, float] = {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for m in machines:
            peak[m.name] = max(peak.get(m.name, 0.0), m.rss_mib())
        states = {i: api.flow_run(i)["state_type"] for i in ids}
        if all(s in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} for s in states.values()):
            break
        time.sleep(2)
    final = {i: api.flow_run(i) for i in ids}
    for i, r in final.items():
        print(f"{r['name']:24} {r['state_name']:10} {code_line(api, i)}")
    assert all(r["state_type"] == "COMPLETED" for r in final.values()), [
        (r["name"], r["state_name"], api.logs(i)[-15:]) for i, r in final.items()
    ]
    print("peak while running:", ", ".join(f"{k} {v:.0f} MiB" for k, v in peak.items()))
    used = [which_machine(api, i, machines) for i in ids]
    assert {m.name for m in used} == {"machine-1", "machine-2"}
    clones = {code_line(api, i).split(" from ")[1].split(";")[0] for i in ids}
    assert len(clones) == 3  # each run its own clone, installed for it
    held = sorted(_holds(api, i) for i in ids)
    for (_, end), (start, _) in itertools.pairwise(held):
        assert end <= start, held  # one run of the model at a time, across both machines
    assert len(_one_champion(workers)[1]) == 3  # the pipeline's and both experiments'


def _one_champion(workers: Workers) -> tuple[str, list[int]]:
    import os

    from mlflow import MlflowClient

    saved = dict(os.environ)
    os.environ.update(workers.project.stack.client_env("reader"))
    try:
        client = MlflowClient(workers.project.stack.mlflow_url)
        versions = sorted(
            int(v.version) for v in client.search_model_versions(f"name = '{workers.model}'")
        )
        champion = client.get_model_version_by_alias(workers.model, "champion").version
    finally:
        os.environ.clear()
        os.environ.update(saved)
    print(f"{workers.model}: versions {versions}, champion v{champion}")
    return champion, versions


def test_a_lost_machine_crashes_its_run_and_another_worker_reruns_it(workers: Workers) -> None:
    api, machines = workers.api, workers.machines
    champion, _ = _one_champion(workers)
    crashing = api.run(RETRAIN, force=True, epochs=100000)["id"]  # long enough to lose its machine
    deadline = time.monotonic() + 300
    while not any("epoch" in ln.lower() for ln in api.logs(crashing)):
        assert time.monotonic() < deadline, api.logs(crashing)[-20:]
        time.sleep(2)
    lost = which_machine(api, crashing, machines)
    (alive,) = [m for m in machines if m is not lost]
    pids = lost.lose()
    killed_at = time.monotonic()
    crashed = api.wait([crashing], 300)[crashing]
    to_crashed = time.monotonic() - killed_at
    print(
        f"{crashed['name']}: {crashed['state_name']} {to_crashed:.0f} s after the kill "
        f"({crashed['state']['message']})"
    )
    assert crashed["state_type"] == "CRASHED"
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]

    deadline = time.monotonic() + 240
    while True:
        reruns = [
            r
            for r in api.runs_of(RETRAIN)
            if (r["created_by"] or {}).get("type") == "AUTOMATION"
            and r["created"] > crashed["created"]
        ]
        if reruns:
            break
        assert time.monotonic() < deadline, "no rerun of the crashed run"
        time.sleep(2)
    rerun = api.wait([reruns[0]["id"]], 420)[reruns[0]["id"]]
    where = which_machine(api, rerun["id"], machines)
    print(
        f"rerun {rerun['name']} by {reruns[0]['created_by']['display_value']}: "
        f"{rerun['state_name']} on {where.name}"
    )
    assert rerun["state_type"] == "COMPLETED", api.logs(rerun["id"])[-20:]
    assert where is alive
    assert _one_champion(workers)[0] == champion  # the lost run registered nothing

    notes = [b for b in workers.receiver.bodies if crashed["name"] in b.get("subject", "")]
    print("notifications:", notes)
    assert notes and "Crashed" in notes[0]["subject"], workers.receiver.bodies


def test_a_commit_whose_lock_differs_stops_its_run_in_one_line(workers: Workers) -> None:
    """Runs last: it deploys a commit pinning numpy 0.0.1, which no machine has."""
    dev, api = workers.dev, workers.api
    lock = dev / "requirements.lock"
    lock.write_text(re.sub(r"(?m)^numpy==.*$", "numpy==0.0.1", lock.read_text()))
    run(dev, "git", "commit", "-qam", "numpy 0.0.1")
    run(dev, "git", "push", "-q")
    env = workers.project.env("writer", PREFECT_HOME=str(dev.parent / "prefect-dev"))
    assert "notifications go to the saved vae-notify block" in _workpool_up(dev, env)
    stopped = api.run(PIPELINE)["id"]
    final = api.wait([stopped], 300)[stopped]
    print(f"{final['name']}: {final['state_name']}: {final['state']['message']}")
    time.sleep(20)  # a rerun, if the state asked for one, would have been created by now
    logs = [
        ln
        for m in workers.machines
        if m.proc.poll() is None
        for ln in (m.folder / "worker.log").read_text().splitlines()
        if "requirements.lock differs" in ln
    ]
    print("\n".join(logs))
    assert logs and "numpy 0.0.1 (installed " in logs[0]
    reruns = [
        r for r in api.runs_of(PIPELINE) if (r["created_by"] or {}).get("type") == "AUTOMATION"
    ]
    assert final["state_type"] == "FAILED" and not reruns, (final, reruns)
    assert final["state"]["message"].startswith("pipelines.worker ready: error: requirements.lock")
    notes = [b for b in workers.receiver.bodies if final["name"] in b.get("subject", "")]
    assert notes and "numpy 0.0.1" in notes[0]["body"], workers.receiver.bodies
