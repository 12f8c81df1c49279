"""Prefect flows end to end on tiny data, against one temporary Prefect server per module.

Prefect reads its settings when it is first imported, so this module imports it (and
``pipelines``) only inside fixtures and tests, after the autouse ``prefect_env`` has pointed
PREFECT_HOME at a tmp folder and turned analytics off.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from tests.conftest import (
    TINY_PARAMS,
    dvc,
    make_dvc_project,
    process_alive,
    run,
    subprocess_env,
    tiny_params,
    write_idx_dataset,
)

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these

REPO = Path(__file__).resolve().parents[2]
NAME = "tiny-vae"
MLFLOW = {
    "enabled": True,
    "experiment": "tiny",
    "registered_model": NAME,
    "register_experiments": False,
}


@pytest.fixture(scope="module", autouse=True)
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect_home")))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("DO_NOT_TRACK", "1")
    mp.setenv("DVC_NO_ANALYTICS", "1")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # each project's own store
    yield
    mp.undo()


@pytest.fixture(scope="module")
def prefect_server(prefect_env: None) -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _png(path: Path, seed: int, size: int = 28) -> None:
    """A grey image of class ``path.parent.name``: a bright bar whose row depends on the class."""
    import numpy as np

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (size, size), dtype=np.uint8)
    row = 4 + 6 * (sum(map(ord, path.parent.name)) % 3)
    img[row : row + 3, 4:24] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _add_images(folder: Path, start: int, n: int) -> None:
    for i in range(start, start + n):
        _png(folder / ("shirts", "shoes", "bags")[i % 3] / f"{i:04d}.png", seed=i)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC project whose data.source is a folder of images outside it, which grows."""
    base = tmp_path_factory.mktemp("prefect_proj")
    _add_images(base / "images", 0, 240)
    data = {"dataset": "folder", "val_fraction": 0.2}
    return make_dvc_project(base / "proj", base / "images", data=data, mlflow=MLFLOW)


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


def _artifacts(flow_run_id: Any) -> dict[str, Any]:
    """``{key: artifact}`` of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def _report(flow_state: Any) -> str:
    from pipelines.flows import REPORT_KEY

    artifact = _artifacts(flow_state.state_details.flow_run_id)[REPORT_KEY]
    assert artifact.type == "markdown"
    return str(artifact.data)


def _client(root: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def _registry(root: Path) -> tuple[list[int], int | None]:
    """The registered versions and the champion's version."""
    client = _client(root)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{NAME}'"))
    try:
        champion = int(client.get_model_version_by_alias(NAME, "champion").version)
    except Exception:  # noqa: BLE001 - no champion yet
        champion = None
    return versions, champion


# --- tasks: retries, deadlines ---------------------------------------------------------------


def _stage_project(root: Path, stages: dict[str, str]) -> Path:
    """A git + DVC project whose stages are the given shell commands, with valid params."""
    (root / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {k: {"cmd": v} for k, v in stages.items()}})
    )
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    run(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    return root


def test_stage_retries_only_what_a_retry_can_fix(prefect_server: None, tmp_path: Path) -> None:
    from prefect import flow

    from pipelines.tasks import RETRIES, StageFailed, run_stage

    # each stage counts its attempts in a file, then exits with the code a `vae` command would
    _stage_project(
        tmp_path,
        {
            name: f"sh -c 'echo x >> {name}.attempts; "
            f'echo "vae {name}: error: {code}"; exit {code}\''
            for name, code in (("bad_data", 1), ("bad_param", 2), ("server_down", 75))
        },
    )
    task = run_stage.with_options(**{**RETRIES, "retry_delay_seconds": 0})

    @flow
    def one_stage(stage: str) -> Any:
        state = task(stage, str(tmp_path), return_state=True)
        return state.is_failed(), state.result(raise_on_failure=False)

    for stage, code, attempts in (("bad_data", 1, 1), ("bad_param", 2, 1), ("server_down", 75, 3)):
        failed, exc = one_stage(stage)
        assert failed and isinstance(exc, StageFailed) and exc.exit_code == code, exc
        assert str(exc) == f"{stage}: vae {stage}: error: {code}", "one line, the command's own"
        assert exc.retryable == (attempts > 1)
        assert (tmp_path / f"{stage}.attempts").read_text().count("x") == attempts, stage
    assert StageFailed("bug", 70, "").retryable and StageFailed("x", None, "").retryable
    assert not StageFailed("slow", None, "", timed_out=True).retryable
    again = pickle.loads(pickle.dumps(exc))  # how Prefect persists a failed task's exception
    assert (str(again), again.exit_code, again.retryable) == (str(exc), 75, True)


def test_task_deadline_kills_the_whole_process_group(prefect_server: None, tmp_path: Path) -> None:
    from prefect import flow

    from pipelines.tasks import StageFailed, run_stage

    # dvc -> sh -> sleep, plus a grandchild that holds the output pipe open
    _stage_project(tmp_path, {"slow": "sh -c 'sleep 300 & echo $! > child.pid; sleep 300'"})

    @flow
    def slow() -> Any:
        state = run_stage("slow", str(tmp_path), None, 3.0, return_state=True)
        return state.result(raise_on_failure=False)

    start = time.monotonic()
    exc = slow()
    took = time.monotonic() - start
    assert isinstance(exc, StageFailed) and exc.timed_out and "after 3 s" in str(exc), exc
    assert took < 30, f"the deadline fired late: {took:.1f} s"
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.time() + 10
    while process_alive(child) and time.time() < deadline:
        time.sleep(0.2)
    assert not process_alive(child), "a grandchild of the stage survived its deadline"


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
    dvc(tmp_path, "init", "-q", "--no-scm")
    assert stage_order(tmp_path) == ["c", "a", "b"]


def test_bad_schedule_names_the_key() -> None:
    from vae.config import ConfigError
    from vae.params import parse_params

    with pytest.raises(ConfigError, match=r"^schedule\.cron: '0 3 \* \*' is not a cron"):
        parse_params({"schedule": {"cron": "0 3 * *"}})
    with pytest.raises(ConfigError, match=r"^schedule\.timezone: 'Mars/Olympus'"):
        parse_params({"schedule": {"timezone": "Mars/Olympus"}})


def test_deployment_carries_the_cron_schedule_from_params(tmp_path: Path) -> None:
    from pipelines.serve import build_deployments

    params = tiny_params(schedule={"cron": "15 4 * * 2", "timezone": "Europe/Berlin"})
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

    from vae.params import load_params

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
    from vae.mlops.registry import decide_promotion

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


# --- one flow run per workspace, and loud failures ------------------------------------------


def test_flow_runs_in_one_workspace_never_overlap(prefect_server: None, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from pipelines.flows import vae_pipeline
    from pipelines.locking import workspace_lock_name

    stamp = (
        "python -c \"import sys,time; open('times','a').write(sys.argv[1]+' %r\\n' % time.time())\""
    )
    _stage_project(tmp_path, {"work": f"{stamp} start && sleep 2 && {stamp} end"})
    states: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda: states.append(vae_pipeline(str(tmp_path), return_state=True))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(states) == 2 and all(s.is_completed() for s in states), states
    # The second run waited for the first: with the stage forced to run twice, its two
    # start/end pairs do not interleave. (DVC found it unchanged the second time, or reran it.)
    events = [line.split() for line in (tmp_path / "times").read_text().splitlines()]
    kinds = [k for k, _ in events]
    assert kinds in (["start", "end"], ["start", "end", "start", "end"]), kinds
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(workspace_lock_name(tmp_path))
    assert (limit.limit, limit.active_slots) == (1, 0)


def test_a_crashed_flow_leaves_an_artifact_and_no_stage_behind(
    prefect_server: None, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL

    from pipelines.reports import FAILURE_KEY

    _stage_project(tmp_path, {"stuck": "sh -c 'echo $$ > stage.pid; sleep 300'"})
    script = (
        "import sys; from prefect import tags; from pipelines.flows import vae_pipeline; "
        "vae_pipeline.with_options(flow_run_name='crash-me')(root=sys.argv[1])"
    )
    env = subprocess_env(PREFECT_API_URL=str(PREFECT_API_URL.value()), PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (tmp_path / "stage.pid").exists() and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        stage_pid = int((tmp_path / "stage.pid").read_text())
        proc.send_signal(signal.SIGTERM)  # what a scheduler or `kill` sends
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not process_alive(stage_pid), "the stage outlived its flow run"
    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["crash-me"]))
        )
    assert flow_run.state is not None and flow_run.state.is_crashed(), flow_run.state
    note = str(_artifacts(flow_run.id)[FAILURE_KEY].data)
    assert "vae-pipeline crashed: flow run `crash-me`" in note
    assert "did not complete:** stuck (" in note and f"prefect flow-run logs {flow_run.id}" in note
    assert f"{tmp_path}/logs/crash-me/<stage>.log" in note
    assert (tmp_path / "logs" / "crash-me" / "stuck.log").is_file()


# --- retraining on a growing folder ----------------------------------------------------------


def test_retrain_first_run_promotes(prefect_server: None, repo: Path) -> None:
    from prefect.client.orchestration import get_client

    from pipelines.flows import stage_order, vae_retrain
    from pipelines.locking import lock_name, workspace_lock_name

    state = vae_retrain(root=str(repo), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    stages = stage_order(repo)
    assert result["status"] == "promoted" and result["champion_version"] == 1
    assert result["stages"] == dict.fromkeys(stages, True)  # every stage ran
    runs = _task_runs(state, len(stages) + 4)
    expected = ["check-data", *stages[:2], "read-versions", *stages[2:], "read-versions"]
    assert [r.name for r in runs] == [*expected, "read-run"]
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]
    report = _report(state)
    assert "challenger promoted" in report and "there was no champion yet" in report
    nll = json.loads((repo / "metrics/eval.json").read_text())["nll_iw"]
    assert f"| nll_iw | - | {nll:.3f} |" in report
    run_id = result["run_id"]
    assert f"MLflow run: [{run_id}](http://127.0.0.1:5000/#/experiments/" in report
    samples = f"{(repo / 'mlruns').as_uri()}/tiny/{run_id}/artifacts/generate/samples.png"
    assert f"Sample grid: [generate/samples.png]({samples})" in report
    assert Path(samples.removeprefix("file://")).is_file()
    link = str(_artifacts(state.state_details.flow_run_id)["vae-retrain-run"].data)
    assert link.startswith(f"[MLflow run {run_id}](http://127.0.0.1:5000/#/experiments/"), link
    champion = _client(repo).get_model_version_by_alias(NAME, "champion")
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert str(champion.version) == "1"
    assert champion.tags["dataset_sha256"] == manifest["dataset_sha256"]
    with get_client(sync_client=True) as client:  # both locks were taken and released
        for name in (lock_name(NAME), workspace_lock_name(repo)):
            limit = client.read_global_concurrency_limit_by_name(name)
            assert (limit.limit, limit.active, limit.active_slots) == (1, True, 0), name


def test_forced_retrain_with_nothing_changed_registers_nothing(
    prefect_server: None, repo: Path
) -> None:
    from pipelines.flows import vae_retrain

    result = vae_retrain(force=True, root=str(repo))
    assert result["status"] == "unchanged" and result["champion_version"] == 1
    assert not any(result["stages"].values())
    assert _registry(repo) == ([1], 1)


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


def _failure(state: Any) -> str:
    from pipelines.reports import FAILURE_KEY

    return str(_artifacts(state.state_details.flow_run_id)[FAILURE_KEY].data)


def test_retrain_follows_a_growing_folder(prefect_server: None, repo: Path) -> None:
    """Same data: skip. New images: retrain and let the gate decide. Corrupt new images: fail
    with one line naming the file, leaving the prepared data, models and registry alone."""
    from pipelines.flows import vae_retrain

    images = repo.parent / "images"
    skipped = vae_retrain(root=str(repo))
    assert skipped["status"] == "skipped" and "unchanged since champion v1" in skipped["reason"]
    assert skipped["stages"] == {"ingest": False, "prepare": False}

    _add_images(images, 240, 120)  # new data arrives
    state = vae_retrain(root=str(repo), return_state=True)
    grown = state.result()
    assert grown["status"] in ("promoted", "kept") and grown["challenger_version"] == 2
    assert all(grown["stages"].values()), grown["stages"]
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert sum(s["count"] for s in manifest["splits"].values()) == 360
    versions, champion = _registry(repo)
    assert versions == [1, 2] and champion == grown["champion_version"]
    assert f"champion v{champion}" in grown["reason"] or champion == 2
    assert vae_retrain(root=str(repo))["status"] == "skipped"

    before = (repo / "data/prepared/manifest.json").read_bytes(), _registry(repo)
    model = (repo / "models/model.pt").read_bytes()
    truncated = images / "shoes" / "9000.png"
    _png(truncated, seed=9000)
    truncated.write_bytes(truncated.read_bytes()[:200])
    wrong_size = images / "bags" / "9001.png"
    for bad, expected in ((truncated, "cannot read the image"), (wrong_size, "(1, 32, 32)")):
        if bad == wrong_size:
            truncated.unlink()
            _png(wrong_size, seed=9001, size=32)
        state = vae_retrain(root=str(repo), return_state=True)
        assert state.is_failed()
        message = str(state.result(raise_on_failure=False))
        assert "\n" not in message and str(bad) in message and expected in message, message
        assert message.startswith("check-data: vae ingest: error: ")
        assert "did not complete:** check-data (Failed)" in _failure(state)
        runs = _task_runs(state, 1)
        assert [r.name for r in runs] == ["check-data"], "nothing ran after the check"
        after = (repo / "data/prepared/manifest.json").read_bytes(), _registry(repo)
        assert after == before and (repo / "models/model.pt").read_bytes() == model
    wrong_size.unlink()
    assert "Data and pipelines are up to date" in dvc(repo, "status")


def test_a_bad_idx_file_fails_the_run_naming_it(prefect_server: None, tmp_path: Path) -> None:
    from pipelines.flows import vae_retrain

    source = write_idx_dataset(tmp_path / "idx", n_train=50, n_test=20)
    bad = source / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:30])
    root = make_dvc_project(tmp_path / "proj", source, mlflow=MLFLOW)
    state = vae_retrain(root=str(root), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert message.startswith(f"check-data: vae ingest: error: {bad}: "), message
    assert not (root / "data" / "raw").exists() and not (root / "mlflow.db").exists()


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


def test_epochs_override_runs_as_an_experiment_and_leaves_no_edit(
    prefect_server: None, repo: Path
) -> None:
    from pipelines.flows import vae_retrain

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = 1e-7  # a challenger that barely moves from its random init
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, "git", "commit", "-qam", "a worse lr")
    before = {p: (repo / p).read_bytes() for p in ("params.yaml", "metrics/train.json")}
    versions, champion = _registry(repo)
    state = vae_retrain(force=True, epochs=1, root=str(repo), return_state=True)
    result = state.result()
    assert result["status"] == "kept", result
    assert result["champion_version"] == champion
    assert result["challenger_version"] == versions[-1] + 1
    assert "champion stays" in result["reason"]
    assert {p: (repo / p).read_bytes() for p in before} == before, "the checkout is untouched"
    exp = result["experiment"]
    assert exp and exp in dvc(repo, "exp", "show", "--csv")
    (exp_run,) = _client(repo).search_runs(
        [_client(repo).get_experiment_by_name("tiny").experiment_id],
        filter_string=f"tags.`dvc.exp_name` = '{exp}'",
    )
    assert exp_run.info.run_id == result["run_id"]
    assert exp_run.data.params["train.epochs"] == "1"
    runs = _task_runs(state, 6)
    assert [r.name for r in runs][-4:] == [
        "read-versions",
        "experiment",
        "read-versions",
        "read-run",
    ]
    report = _report(state)
    assert "champion kept" in report and f"DVC experiment: `{exp}`" in report


def test_the_documented_failure_automation_is_accepted(prefect_server: None) -> None:
    """docs/prefect.md's automation snippet runs as written against a Prefect server."""
    from prefect.automations import Automation

    text = (REPO / "docs" / "prefect.md").read_text()
    (snippet,) = [b.split("```")[0] for b in text.split("```python\n")[1:] if "Automation(" in b]
    exec(compile(snippet, "docs/prefect.md", "exec"), {})
    automation = Automation.read(name="vae flow failed")
    assert automation.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert automation.actions[0].type == "send-notification"
