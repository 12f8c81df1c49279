"""The flows' tasks: a DVC stage, the data check, a DVC experiment, and registry queries.

Every command runs in its own process group under a deadline (``schedule.timeout_minutes``),
after which the whole group is killed (:mod:`pipelines.procs`); its output goes to the task's
log and to ``logs/<flow run>/<task>.log``.

Only the tasks that touch data or services are retried (``ingest`` reads the raw data;
``register`` and the registry queries talk to MLflow), and only for failures a retry can fix: a
command that exited with 1 (bad data, a corrupt checkpoint, ...) or 2 (a bad param), or ran out
of time, fails at once; 75 (a service out of reach), 70 (an unexpected exception) or a DVC
failure of its own are retried (see ``vae/cli.py`` for the codes). ``train`` is never retried
blindly: a rerun resumes from ``models/checkpoint.pt`` by itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines.procs import CommandTimeout, run_command
from pipelines.reports import mlflow_links, stage_log_dir
from vae.errors import EXIT_ERROR, EXIT_USAGE, PermanentError
from vae.mlops.store import tracking_uri
from vae.outputs import REGISTRY_RECORD

__all__ = [
    "RETRIES",
    "StageFailed",
    "check_data",
    "project_env",
    "read_run_links",
    "read_versions",
    "run_experiment",
    "run_stage",
    "stage_order",
]

PERMANENT_EXIT_CODES = frozenset({EXIT_ERROR, EXIT_USAGE})  # `vae` codes no retry can fix


class StageFailed(PermanentError, RuntimeError):
    """A task's command failed; ``exit_code`` is the ``vae`` command's (None: DVC's own)."""

    def __init__(
        self, stage: str, exit_code: int | None, tail: str, timed_out: bool = False
    ) -> None:
        reason = _error_line(tail) or (
            "DVC itself failed" if exit_code is None else f"its command exited with {exit_code}"
        )
        super().__init__(f"{stage}: {reason}")
        self.stage, self.exit_code, self.tail, self.timed_out = stage, exit_code, tail, timed_out

    def __reduce__(self) -> tuple[Any, ...]:  # Prefect persists a failed task's exception
        return StageFailed, (self.stage, self.exit_code, self.tail, self.timed_out)

    @property
    def retryable(self) -> bool:
        return not self.timed_out and self.exit_code not in PERMANENT_EXIT_CODES


def _error_line(tail: str) -> str | None:
    """The one line that says what went wrong: the ``vae`` command's, else DVC's."""
    lines = tail.splitlines()
    for pattern in (r"^vae [\w-]+: error: ", r"^ERROR: ", r"^\S.*Error: "):
        found = [ln for ln in lines if re.match(pattern, ln)]
        if found:
            return found[-1]
    return None


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: no retries for a stage that failed for good."""
    exc = state.data
    return not isinstance(exc, StageFailed) or exc.retryable


RETRIES: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [10, 60],
    "retry_condition_fn": _retry_if_transient,
}


def stage_order(root: str | Path = ".") -> list[str]:
    """The stages of ``root/dvc.yaml`` in topological order, ties kept in file order."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        # The pipeline stages of the top dvc.yaml (not .dvc files, not nested dvc.yaml files).
        stages = [s for s in repo.index.stages if s.cmd and s.path_in_repo == "dvc.yaml"]
        # DVC's graph has an edge from each stage to the stages it depends on.
        graph = repo.index.graph.subgraph(stages).reverse()
        position = {s: i for i, s in enumerate(stages)}
        return [s.name for s in nx.lexicographical_topological_sort(graph, position.get)]


def project_env(root: Path) -> dict[str, str]:
    """The commands' environment: the venv's ``vae`` on PATH and one MLflow store for all."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = tracking_uri(root)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_logged(
    name: str, cmd: list[str], root: str, timeout: float, direct: bool = False
) -> list[str]:
    """Run ``cmd`` in ``root`` (output to the task's log and the stage's log file); its output.

    ``direct``: ``cmd`` is a ``vae`` command, whose exit code is its own; otherwise it is DVC,
    which reports the failed stage's exit code in its output.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    lines: list[str] = []

    def on_line(line: str) -> None:
        logger.info("%s", line)
        lines.append(line)

    log_file = stage_log_dir(root, flow_run.get_name() or "no-flow-run") / f"{name}.log"
    try:
        result = run_command(cmd, root, project_env(Path(root)), timeout, on_line, log_file)
    except CommandTimeout as exc:
        raise StageFailed(name, None, f"ERROR: {exc}", timed_out=True) from None
    if result.returncode:
        tail = "\n".join(result.tail)
        # DVC ends with "failed to run: <cmd>, exited with N" when the stage's command failed
        found = re.findall(r"exited with (-?\d+)", tail)
        code = result.returncode if direct else (int(found[-1]) if found else None)
        raise StageFailed(name, code, tail)
    return lines


@task(name="dvc-stage", cache_policy=NO_CACHE)  # DVC is the cache
def run_stage(stage: str, root: str, timeout: float = 10800) -> bool:
    """``dvc repro -s <stage>`` with its output in this task's log; True if the stage ran."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    lines = _run_logged(stage, cmd, root, timeout)
    return any(f"Running stage '{stage}'" in line for line in lines)


@task(name="check-data", task_run_name="check-data", cache_policy=NO_CACHE)
def check_data(root: str, timeout: float) -> None:
    """``vae ingest --check``: every file of data.source reads, before DVC deletes anything."""
    cmd = [sys.executable, "-m", "vae", "ingest", "--check"]
    _run_logged("check-data", cmd, root, timeout, direct=True)


@task(name="dvc-exp", task_run_name="experiment", cache_policy=NO_CACHE)
def run_experiment(root: str, name: str, overrides: list[str], timeout: float) -> dict[str, Any]:
    """``dvc exp run --temp`` with ``-S`` overrides; returns its ``metrics/registry.json``.

    The experiment runs in a copy under ``.dvc/tmp/exps``, so the checkout's ``params.yaml``
    and outputs stay as they were; DVC records it (``dvc exp show``) and its MLflow run lands in
    the project's store (``DVC_ROOT``).
    """
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "--name", name]
    for override in overrides:
        cmd += ["-S", override]
    _run_logged("experiment", cmd, root, timeout)
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps/"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    (ref,) = [r for r in refs if r.rsplit("/", 1)[-1] == name]
    shown = subprocess.run(
        ["git", "show", f"{ref}:{REGISTRY_RECORD.as_posix()}"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(shown.stdout)


@task(name="read-versions", task_run_name="read-versions", cache_policy=NO_CACHE, **RETRIES)
def read_versions(name: str, uri: str, versions: dict[str, str | int | None]) -> dict[str, Any]:
    """``{label: {"version", "tags"} or None}`` for aliases (str) or version numbers (int)."""
    from mlflow.exceptions import MlflowException

    from vae.mlops import store

    client = store.client(uri)
    # A model not registered yet has no versions; ask first: MLflow's auth app answers an alias
    # lookup on a missing model with 403, not 404 (a first vae-retrain run on a team's server)
    if not client.search_registered_models(filter_string=f"name = '{name}'", max_results=1):
        return dict.fromkeys(versions)
    out: dict[str, Any] = {}
    for label, ref in versions.items():
        try:
            if isinstance(ref, str):
                mv = client.get_model_version_by_alias(name, ref)
            elif ref is not None:
                mv = client.get_model_version(name, str(ref))
            else:
                mv = None
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise  # a service problem: let the task retry
            mv = None
        out[label] = {"version": int(mv.version), "tags": dict(mv.tags)} if mv else None
    return out


@task(name="read-run", task_run_name="read-run", cache_policy=NO_CACHE, **RETRIES)
def read_run_links(uri: str, run_id: str) -> dict[str, str]:
    """Links to MLflow run ``run_id`` and its sample grid, for the report."""
    from vae.mlops import store

    run = store.client(uri).get_run(run_id)
    return mlflow_links(uri, run.info.experiment_id, run_id, run.info.artifact_uri)
