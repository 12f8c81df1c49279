"""Tasks and flow runs against one temporary Prefect server: retries only of what a retry can
fix, deadlines that kill a stage's whole process group, the registry lock, one flow run per
workspace, and loud failures (a crash artifact, the documented failure automation).

Prefect reads its settings when it is first imported, so this module imports it (and
``pipelines``) only inside fixtures and tests, after the autouse ``prefect_env`` has pointed
PREFECT_HOME at a tmp folder and turned analytics off.
"""

from __future__ import annotations

import itertools
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, TINY_PARAMS, dvc, process_alive, run, subprocess_env
from tests.e2e.prefect_helpers import _artifacts

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these


@pytest.fixture(scope="module", autouse=True)
def _prefect_env(prefect_env: None) -> None:
    """Every test here runs with ``prefect_env`` (conftest.py) set, as if it asked for it."""


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
        state = run_stage("slow", str(tmp_path), 3.0, return_state=True)
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

    from vae.locks import registry_lock

    candidates = [5.0, 3.0, 4.0, 6.0]  # the best is version 2
    # Without the lock the race is real: every thread reads "no champion" and promotes itself.
    _, sections = _racing_registrations(contextlib.nullcontext, candidates)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(sections))

    registry, sections = _racing_registrations(
        functools.partial(registry_lock, "http://mlflow.example", "race-model", 60), candidates
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


def test_the_automations_file_is_accepted_and_applied_once(prefect_server: None) -> None:
    """pipelines/automations.yaml against a Prefect server: created, then updated by name on a
    second ``up`` (never duplicated), the notification pointing at the saved webhook block."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client

    from pipelines.workpool import apply_automations, save_notify_block, saved_notify_block

    assert saved_notify_block() is None
    block = save_notify_block("http://127.0.0.1:9/hook")
    assert saved_notify_block() == block
    first = apply_automations(notify_block=block)
    again = apply_automations(notify_block=block)
    assert first == ["vae-crash-zombie-runs created", "vae-notify-failed-runs created"]
    assert again == ["vae-crash-zombie-runs updated", "vae-notify-failed-runs updated"]
    with get_client(sync_client=True) as client:
        names = [a.name for a in client.read_automations()]
    assert sorted(names) == ["vae-crash-zombie-runs", "vae-notify-failed-runs"]
    notify = Automation.read(name="vae-notify-failed-runs")
    assert notify.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert notify.actions[0].type == "send-notification"
    assert notify.actions[0].block_document_id == block
