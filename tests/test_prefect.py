"""Prefect flows end to end on tiny data, against one temporary Prefect server per module.

Prefect reads its settings when it is first imported, so this module imports it (and
``pipelines``) only inside fixtures and tests, after the autouse ``prefect_env`` has pointed
PREFECT_HOME at a tmp folder and turned analytics off.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import TINY_PARAMS, write_idx_dataset

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-vae"


@pytest.fixture(scope="module", autouse=True)
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect_home")))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("DO_NOT_TRACK", "1")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def prefect_server(prefect_env: None) -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _run(cwd: Path, *args: str) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"


def _params(**sections: dict[str, Any]) -> dict[str, Any]:
    params = {k: dict(v) for k, v in TINY_PARAMS.items()}
    params["mlflow"] = {"enabled": True, "experiment": "tiny", "registered_model": NAME}
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    return params


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tmp git + DVC project (as tests/test_pipeline.py builds it) with its own MLflow db."""
    root = tmp_path_factory.mktemp("prefect_proj")
    shutil.copytree(REPO / "vae", root / "vae", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(_params(), sort_keys=False))
    write_idx_dataset(root / "data" / "raw" / "fashion_mnist", n_train=200, n_test=50)
    (root / ".gitignore").write_text("/data/raw/\n__pycache__/\n/mlflow.db\n/mlruns/\n")
    _run(root, "git", "init", "-q")
    _run(root, sys.executable, "-m", "dvc", "init", "-q")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    yield root
    mp.undo()


def _task_runs(flow_state: Any, expected: int) -> list[Any]:
    """The flow run's task runs, oldest first, once the server has all of them in a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    deadline = time.time() + 30
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            done = [r for r in runs if r.state is not None and r.state.is_final()]
            if len(done) >= expected or time.time() > deadline:
                return sorted(runs, key=lambda r: r.start_time or r.expected_start_time)
            time.sleep(0.5)


def _report(flow_state: Any) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from pipelines.flows import REPORT_KEY

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert artifact.key == REPORT_KEY and artifact.type == "markdown"
    return str(artifact.data)


def _client() -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def test_stage_retries_only_what_a_retry_can_fix(prefect_server: None, tmp_path: Path) -> None:
    from prefect import flow

    from pipelines.flows import RETRIES, StageFailed, run_stage

    # each stage counts its attempts in a file, then exits with the code a `vae` command would
    stages = {
        name: {"cmd": f"sh -c 'echo x >> {name}.attempts; exit {code}'"}
        for name, code in (("bad_data", 1), ("bad_param", 2), ("server_down", 75), ("bug", 70))
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    _run(tmp_path, "git", "init", "-q")
    _run(tmp_path, sys.executable, "-m", "dvc", "init", "-q")
    task = run_stage.with_options(**{**RETRIES, "retry_delay_seconds": 0})

    @flow
    def one_stage(stage: str) -> Any:
        state = task(stage, str(tmp_path), return_state=True)
        return state.is_failed(), state.result(raise_on_failure=False)

    for stage, code, attempts in (("bad_data", 1, 1), ("bad_param", 2, 1), ("server_down", 75, 3)):
        failed, exc = one_stage(stage)
        assert failed and isinstance(exc, StageFailed) and exc.exit_code == code, exc
        assert exc.retryable == (attempts > 1)
        assert (tmp_path / f"{stage}.attempts").read_text().count("x") == attempts, stage
    assert StageFailed("bug", 70, "").retryable and StageFailed("x", None, "").retryable


# --- one definition of the stage graph, the schedule and the deployments ---------------------


def test_flow_stages_are_dvc_yaml_in_topological_order(tmp_path: Path) -> None:
    from pipelines.flows import stage_order

    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert stage_order(REPO) == stages  # dvc.yaml lists them in a valid order already
    # A stage listed before the one it depends on still runs after it.
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "b": {"cmd": "cp a.txt b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
                    "c": {"cmd": "echo c > c.txt", "outs": ["c.txt"]},
                    "a": {"cmd": "echo a > a.txt", "outs": ["a.txt"]},
                }
            },
            sort_keys=False,
        )
    )
    _run(tmp_path, sys.executable, "-m", "dvc", "init", "-q", "--no-scm")
    assert stage_order(tmp_path) == ["c", "a", "b"]


def test_bad_schedule_names_the_key() -> None:
    from vae.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match=r"^schedule\.cron: '0 3 \* \*' is not a cron"):
        parse_params({"schedule": {"cron": "0 3 * *"}})
    with pytest.raises(ConfigError, match=r"^schedule\.timezone: 'Mars/Olympus'"):
        parse_params({"schedule": {"timezone": "Mars/Olympus"}})


def test_deployment_carries_the_cron_schedule_from_params(tmp_path: Path) -> None:
    from pipelines.serve import build_deployments

    params = _params(schedule={"cron": "15 4 * * 2", "timezone": "Europe/Berlin"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    pipeline, retrain = build_deployments(tmp_path)
    assert (pipeline.flow_name, retrain.flow_name) == ("vae-pipeline", "vae-retrain")
    assert pipeline.schedules == []
    (schedule,) = retrain.schedules
    assert schedule.schedule.cron == "15 4 * * 2"
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert schedule.active
    assert retrain.parameters == {"root": str(tmp_path.resolve()), "force": False}


def test_prefect_yaml_deploys_the_same_flows_and_schedule() -> None:
    from prefect.flows import load_flow_from_entrypoint

    from vae.config import load_params

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["entrypoint"]: d for d in config["deployments"]}
    names = {}
    old = Path.cwd()
    os.chdir(REPO)  # entrypoints are relative to the project
    try:
        for entrypoint in deployments:
            names[entrypoint] = load_flow_from_entrypoint(entrypoint).name
    finally:
        os.chdir(old)
    assert sorted(names.values()) == ["vae-pipeline", "vae-retrain"]
    (retrain,) = [d for e, d in deployments.items() if names[e] == "vae-retrain"]
    (schedule,) = retrain["schedules"]
    params = load_params(REPO / "params.yaml").schedule
    assert (schedule["cron"], schedule["timezone"]) == (params.cron, params.timezone)
    assert {d["work_pool"]["name"] for d in config["deployments"]} == {"vae-process"}


# --- the registry lock -----------------------------------------------------------------------


def _racing_registrations(lock: Any, candidates: list[float]) -> tuple[dict, list]:
    """Register ``candidates`` (nll_iw) from one thread each, all at once, through the real
    promotion gate over an in-memory registry; returns the registry and the critical sections."""
    from vae.registry import decide_promotion

    registry: dict[str, Any] = {"champion": None, "nll": {}}
    sections: list[tuple[float, float]] = []
    start = threading.Barrier(len(candidates))
    errors: list[BaseException] = []

    def register(version: str, nll: float) -> None:
        try:
            start.wait()
            with lock():
                entered = time.monotonic()
                champion = registry["champion"]  # read ...
                time.sleep(0.2)  # ... (logging the model, re-scoring the champion) ...
                promoted, _ = decide_promotion(nll, registry["nll"].get(champion), champion)
                registry["nll"][version] = nll
                if promoted:  # ... then move the alias
                    registry["champion"] = version
                sections.append((entered, time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=register, args=(str(i + 1), nll))
        for i, nll in enumerate(candidates)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return registry, sorted(sections)


def test_registry_lock_makes_registrations_sequential(prefect_server: None) -> None:
    import contextlib
    import functools

    from pipelines.locking import registry_lock

    candidates = [5.0, 3.0, 4.0, 6.0]  # the best is version 2
    # Without the lock the race is real: every thread reads "no champion" and promotes itself.
    _, sections = _racing_registrations(contextlib.nullcontext, candidates)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(sections))

    registry, sections = _racing_registrations(
        functools.partial(registry_lock, "race-model", timeout_seconds=60), candidates
    )
    assert len(sections) == len(candidates)
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(sections)), sections
    assert registry["champion"] == "2"


# --- the flows, end to end -------------------------------------------------------------------


def test_retrain_first_run_promotes(prefect_server: None, repo: Path) -> None:
    from pipelines.flows import stage_order, vae_retrain

    state = vae_retrain(root=str(repo), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    stages = stage_order(repo)
    assert result["status"] == "promoted" and result["champion_version"] == 1
    assert result["stages"] == dict.fromkeys(stages, True)  # every stage ran
    runs = _task_runs(state, len(stages) + 2)
    assert [r.name for r in runs] == [stages[0], "read-versions", *stages[1:], "read-versions"]
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]
    report = _report(state)
    assert "challenger promoted" in report and "there was no champion yet" in report
    nll = json.loads((repo / "metrics/eval.json").read_text())["nll_iw"]
    assert f"| nll_iw | - | {nll:.3f} |" in report
    champion = _client().get_model_version_by_alias(NAME, "champion")
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert str(champion.version) == "1"
    assert champion.tags["dataset_sha256"] == manifest["dataset_sha256"]
    # `register` ran under the registry lock, which the flow created, and released it
    from prefect.client.orchestration import get_client

    from pipelines.locking import lock_name

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(lock_name(NAME))
    assert (limit.limit, limit.active, limit.active_slots) == (1, True, 0)


def test_retrain_rejects_a_bad_epochs_override_before_any_work(
    prefect_server: None, repo: Path
) -> None:
    from pipelines.flows import vae_retrain
    from vae.config import ConfigError

    before = (repo / "params.yaml").read_text()
    state = vae_retrain(epochs=0, root=str(repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match=r"^train\.epochs: 0 is out of range"):
        state.result()
    assert (repo / "params.yaml").read_text() == before


def test_retrain_skips_when_the_data_is_unchanged(prefect_server: None, repo: Path) -> None:
    from pipelines.flows import vae_retrain

    state = vae_retrain(root=str(repo), return_state=True)
    result = state.result()
    assert result["status"] == "skipped" and result["stages"] == {"prepare": True}
    assert "dataset is unchanged since champion v1" in result["reason"]
    runs = _task_runs(state, 2)
    assert [r.name for r in runs] == ["prepare", "read-versions"]
    assert all(r.state.is_completed() for r in runs)
    report = _report(state)
    assert "vae-retrain: skipped" in report and "| nll_iw |" in report
    assert len(_client().search_model_versions(f"name = '{NAME}'")) == 1


def test_forced_retrain_with_nothing_changed_registers_nothing(
    prefect_server: None, repo: Path
) -> None:
    from pipelines.flows import vae_retrain

    result = vae_retrain(force=True, root=str(repo))
    assert result["status"] == "unchanged" and result["champion_version"] == 1
    assert not any(ran for stage, ran in result["stages"].items() if stage != "prepare")
    assert len(_client().search_model_versions(f"name = '{NAME}'")) == 1


def test_pipeline_flow_one_task_per_stage(prefect_server: None, repo: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from pipelines.flows import stage_order, vae_pipeline

    # The stages ran in the retraining flow: here each task finds its stage up to date.
    state = vae_pipeline(root=str(repo), return_state=True)
    assert state.is_completed(), state
    stages = stage_order(repo)
    assert state.result() == dict.fromkeys(stages, False)
    runs = _task_runs(state, len(stages))
    assert [r.name for r in runs] == stages
    assert all(r.state.is_completed() for r in runs)
    APILogWorker.drain_all(timeout=10)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    text = "\n".join(log.message for log in logs)
    for stage in stages:  # DVC's own output, in each stage's task log
        assert f"Stage '{stage}' didn't change, skipping" in text, text


def test_worse_challenger_leaves_the_champion(prefect_server: None, repo: Path) -> None:
    from pipelines.flows import vae_retrain

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = 1e-7  # a challenger that barely moves from its random init
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    state = vae_retrain(force=True, epochs=1, root=str(repo), return_state=True)
    result = state.result()
    assert result["status"] == "kept", result
    assert result["champion_version"] == 1 and result["challenger_version"] == 2
    assert "champion stays" in result["reason"]
    # the epochs override went through params.yaml, as `dvc exp run -S` would
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["epochs"] == 1
    assert json.loads((repo / "metrics/train.json").read_text())["epochs"] == 1
    client = _client()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    report = _report(state)
    assert "champion kept" in report and "| metric (test) | champion v1 | challenger v2 |" in report
