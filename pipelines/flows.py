"""Prefect flows over the DVC pipeline: ``vae-pipeline`` and ``vae-retrain``.

There is one definition of the stage graph, ``dvc.yaml``: the flows read its stages in
topological order from DVC and run each as one Prefect task, ``dvc repro --single-item <stage>``,
so DVC keeps its caching and ``dvc.lock`` and Prefect shows every stage's state, duration and
log. DVC locks the workspace, so stages run one at a time.

Only the tasks that touch data or services are retried (``prepare`` reads or downloads raw
data; ``register`` and the registry queries talk to MLflow), and only for failures a retry can
fix: a stage whose ``vae`` command exited with 1 (bad data, a corrupt checkpoint, ...) or 2 (a
bad param) fails at once; 75 (a service or download out of reach), 70 (an unexpected
exception) or a DVC failure of its own are retried (see ``vae/cli.py`` for the codes). ``train``
is never retried blindly: a rerun resumes from ``models/checkpoint.pt`` by itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.locking import registry_lock
from vae.cli import EXIT_ERROR, EXIT_USAGE
from vae.config import ConfigError, load_params, parse_params
from vae.io import load_json
from vae.mlflow_tracker import DEFAULT_TRACKING_URI, tracking_uri

__all__ = [
    "StageFailed",
    "project_env",
    "project_tracking_uri",
    "read_versions",
    "run_stage",
    "stage_order",
    "vae_pipeline",
    "vae_retrain",
]

PREPARE, REGISTER = "prepare", "register"  # the stages the retraining gate is built around
IO_STAGES = frozenset({PREPARE, REGISTER})
# `vae` exit codes that no retry can fix (vae/cli.py)
PERMANENT_EXIT_CODES = frozenset({EXIT_ERROR, EXIT_USAGE})


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage failed; ``exit_code`` is its command's (None: DVC's own)."""

    def __init__(self, stage: str, exit_code: int | None, tail: str) -> None:
        code = "DVC itself failed" if exit_code is None else f"its command exited with {exit_code}"
        super().__init__(f"stage {stage!r} failed: {code}:\n{tail}")
        self.stage, self.exit_code = stage, exit_code

    @property
    def retryable(self) -> bool:
        return self.exit_code not in PERMANENT_EXIT_CODES


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: no retries for a stage that failed for good."""
    exc = state.data
    return not isinstance(exc, StageFailed) or exc.retryable


RETRIES: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [10, 60],
    "retry_condition_fn": _retry_if_transient,
}
REPORT_KEY = "vae-retrain-report"
METRICS = ("nll_iw", "elbo", "recon", "kl", "elbo_gap", "bits_per_dim", "active_units")


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
    """The stages' environment: the venv's ``vae`` on PATH and one MLflow store for all."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = project_tracking_uri(root)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def project_tracking_uri(root: Path) -> str:
    """``vae.mlflow_tracker.tracking_uri()`` as the stages see it from ``root`` (their cwd)."""
    uri = tracking_uri()
    return f"sqlite:///{root / 'mlflow.db'}" if uri == DEFAULT_TRACKING_URI else uri


@task(name="dvc-stage", cache_policy=NO_CACHE)  # DVC is the cache
def run_stage(stage: str, root: str, lock: str | None = None) -> bool:
    """``dvc repro -s <stage>`` with its output in this task's log; True if the stage ran.

    ``lock``: hold this registry lock (see :mod:`pipelines.locking`) while the stage runs.
    """
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    tail: deque[str] = deque(maxlen=20)
    ran = False
    with registry_lock(lock) if lock else contextlib.nullcontext():
        with subprocess.Popen(
            cmd,
            cwd=root,
            env=project_env(Path(root)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    logger.info("%s", line)
                    tail.append(line)
                    ran = ran or f"Running stage '{stage}'" in line
        if proc.returncode:
            # DVC ends with "failed to run: <cmd>, exited with N" when the stage's command failed
            found = re.findall(r"exited with (-?\d+)", "\n".join(tail))
            raise StageFailed(stage, int(found[-1]) if found else None, "\n".join(tail))
    return ran


def _stage_task(stage: str) -> Any:
    options: dict[str, Any] = {"name": stage, "task_run_name": stage}
    return run_stage.with_options(**options, **(RETRIES if stage in IO_STAGES else {}))


def _run(stage: str, root: str, registered_model: str) -> bool:
    lock = registered_model if stage == REGISTER else None
    return _stage_task(stage)(stage, root, lock)


@flow(name="vae-pipeline")
def vae_pipeline(root: str = ".") -> dict[str, bool]:
    """The DVC pipeline, one task per stage; ``{stage: ran}`` (False = DVC found it up to date)."""
    root = str(Path(root).resolve())
    cfg = load_params(Path(root) / "params.yaml")  # a bad param fails before any work
    return {s: _run(s, root, cfg.mlflow.registered_model) for s in stage_order(root)}


@task(name="read-versions", task_run_name="read-versions", cache_policy=NO_CACHE, **RETRIES)
def read_versions(name: str, uri: str, versions: dict[str, str | int | None]) -> dict[str, Any]:
    """``{label: {"version", "tags"} or None}`` for aliases (str) or version numbers (int)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
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


@flow(name="vae-retrain")
def vae_retrain(force: bool = False, epochs: int | None = None, root: str = ".") -> dict[str, Any]:
    """Retrain when the data changed (or ``force``), then let the registry's gate decide.

    ``force`` skips the data check only: DVC still skips a stage whose inputs are unchanged
    (the same inputs give the same model), so a forced run with nothing changed registers
    nothing and says so (status ``unchanged``).

    ``epochs`` overrides ``train.epochs`` the way ``dvc exp run -S train.epochs=N`` does: it is
    written to ``params.yaml`` (visible in ``git diff`` and recorded in ``dvc.lock``), so DVC
    reruns ``train``. That resumes from its checkpoint when only the epoch count was raised and
    the lr is constant (``train.lr_decay: 0``); a decaying lr spans the epochs, so it retrains.
    """
    logger = get_run_logger()
    root = str(Path(root).resolve())
    cfg = load_params(Path(root) / "params.yaml")
    if epochs is not None:  # validate the override before any work
        parse_params({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "epochs": epochs}})
    if not cfg.mlflow.enabled:
        raise ConfigError("mlflow.enabled: vae-retrain needs the MLflow registry; set it true")
    name, uri = cfg.mlflow.registered_model, project_tracking_uri(Path(root))
    stages = stage_order(root)
    if PREPARE not in stages or REGISTER not in stages:
        raise ValueError(f"dvc.yaml must have stages {PREPARE!r} and {REGISTER!r}: {stages}")

    _run(PREPARE, root, name)
    dataset = load_json(Path(root) / "data/prepared/manifest.json")["dataset_sha256"]
    champion = read_versions(name, uri, {"champion": "champion"})["champion"]
    champion_data = champion["tags"].get("dataset_sha256") if champion else None
    if champion_data == dataset and not force:
        reason = f"the dataset is unchanged since champion v{champion['version']} ({dataset[:12]})"
        logger.info("skipping retraining: %s", reason)
        return _outcome("skipped", reason, dataset, {PREPARE: True}, champion)

    if epochs is not None:
        from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls

        logger.warning("params.yaml: setting train.epochs to %d for this run", epochs)
        apply_overrides(Path(root) / "params.yaml", [f"train.epochs={epochs}"])
    ran = {PREPARE: True, **{s: _run(s, root, name) for s in stages if s != PREPARE}}
    if not ran[REGISTER]:  # metrics/registry.json is the previous registration's
        reason = "DVC found every input of `register` unchanged since it last ran; nothing new"
        return _outcome("unchanged", reason, dataset, ran, champion)

    decision = load_json(Path(root) / "metrics/registry.json")
    refs = {"champion": decision["previous_champion_version"], "challenger": decision["version"]}
    versions = read_versions(name, uri, refs)
    if versions["champion"] is not None and decision["champion_nll_iw"] is not None:
        # What the gate compared: re-scored if the champion was tested on other data.
        versions["champion"]["tags"]["nll_iw"] = str(decision["champion_nll_iw"])
    status = "promoted" if decision["promoted"] else "kept"
    return _outcome(status, decision["reason"], dataset, ran, **versions)


def _outcome(
    status: str,
    reason: str,
    dataset: str,
    stages: dict[str, bool],
    champion: dict[str, Any] | None,
    challenger: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Publish the report artifact and return the flow's result.

    ``champion`` is the champion the challenger was measured against (or the current one when
    nothing was registered); the one in office afterwards is ``champion_version``.
    """
    now = challenger if status == "promoted" else champion
    result = {
        "status": status,
        "reason": reason,
        "champion_version": now["version"] if now else None,
        "challenger_version": challenger["version"] if challenger else None,
        "dataset_sha256": dataset,
        "stages": stages,
    }
    _publish(result, champion, challenger)
    return result


def _publish(
    result: dict[str, Any], champion: dict[str, Any] | None, challenger: dict[str, Any] | None
) -> None:
    """The Prefect markdown artifact: the decision and champion vs challenger test metrics."""
    title = {
        "skipped": "skipped",
        "unchanged": "nothing to retrain",
        "promoted": "challenger promoted",
        "kept": "champion kept",
    }
    now = result["champion_version"]
    head = [
        f"## vae-retrain: {title[result['status']]}",
        "",
        f"**Decision:** {result['status']}. **Reason:** {result['reason']}.",
        "",
        f"Dataset sha256: `{result['dataset_sha256']}`. "
        f"Champion now: {f'v{now}' if now is not None else 'none'}.",
        "",
    ]
    cols = [("champion", champion), ("challenger", challenger)]
    header = " | ".join(f"{label} v{mv['version']}" if mv else label for label, mv in cols)
    rows = [f"| metric (test) | {header} |", "| --- | ---: | ---: |"]
    for metric in METRICS:
        cells = " | ".join(_cell(mv, metric) for _, mv in cols)
        rows.append(f"| {metric} | {cells} |")
    create_markdown_artifact(
        "\n".join(head + rows) + "\n",
        key=REPORT_KEY,
        description="vae-retrain: champion vs challenger and the promotion decision",
    )


def _cell(mv: dict[str, Any] | None, metric: str) -> str:
    value = mv["tags"].get(metric) if mv else None
    if value is None:
        return "-"
    try:
        return f"{float(value):.3f}" if metric != "active_units" else str(int(float(value)))
    except ValueError:
        return str(value)
