"""Prefect flows over the DVC pipeline: ``vae-pipeline`` and ``vae-retrain``.

There is one definition of the stage graph, ``dvc.yaml``: the flows read its stages in
topological order from DVC and run each as one Prefect task (:mod:`pipelines.tasks`), ``dvc
repro --single-item <stage>``, so DVC keeps its caching and ``dvc.lock`` and Prefect shows every
stage's state, duration and log. A workspace-wide Prefect concurrency limit keeps two flow runs
out of one checkout at a time (:mod:`pipelines.locking`), every task has a deadline after which
its process group is killed, and a failed or crashed flow run leaves the ``vae-flow-failure``
artifact (:mod:`pipelines.reports`). The flows only orchestrate.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from pipelines.locking import retrain_lock, workspace_lock
from pipelines.reports import (
    REPORT_KEY,
    SAMPLES_KEY,
    TABLE_KEY,
    metrics_table,
    report_failure,
    retrain_markdown,
)
from pipelines.tasks import (
    RETRIES,
    StageFailed,
    check_data,
    read_run_links,
    read_versions,
    run_experiment,
    run_stage,
    stage_order,
)
from vae.atomic import load_json
from vae.config import Config, ConfigError
from vae.mlops.store import tracking_uri
from vae.outputs import MANIFEST, REGISTRY_RECORD
from vae.params import load_params, parse_params

__all__ = [
    "REPORT_KEY",
    "RETRIES",
    "StageFailed",
    "run_stage",
    "stage_order",
    "vae_pipeline",
    "vae_retrain",
]

PREPARE, REGISTER = "prepare", "register"  # the retraining gate sits between these two
IO_STAGES = frozenset({"ingest", REGISTER})  # they read data or talk to MLflow: retried


def _run(stage: str, root: str, cfg: Config) -> bool:
    """Stage ``stage`` as its own task, with its deadline and retries (``vae register`` takes
    the registry lock itself)."""
    timeout = cfg.schedule.timeout_seconds
    options: dict[str, Any] = {"name": stage, "task_run_name": stage}
    options["timeout_seconds"] = timeout + 60  # a backstop; the task kills the stage first
    if stage in IO_STAGES:
        options.update(RETRIES)
    return run_stage.with_options(**options)(stage, root, timeout)


@flow(name="vae-pipeline", on_failure=[report_failure], on_crashed=[report_failure])
def vae_pipeline(root: str = ".") -> dict[str, bool]:
    """The DVC pipeline, one task per stage; ``{stage: ran}`` (False = DVC found it up to date)."""
    root = str(Path(root).resolve())
    cfg = load_params(Path(root) / "params.yaml")  # a bad param fails before any work
    _log_code(root)
    with _locks(root, cfg):
        return {s: _run(s, root, cfg) for s in stage_order(root)}


@flow(name="vae-retrain", on_failure=[report_failure], on_crashed=[report_failure])
def vae_retrain(force: bool = False, epochs: int | None = None, root: str = ".") -> dict[str, Any]:
    """Retrain when the data changed (or ``force``), then let the registry's gate decide.

    First ``vae ingest --check`` reads every file of ``data.source``: corrupt new data fails
    the run there, naming the file, before DVC deletes any output, so the prepared data, the
    models and the registry stay as they were. Then DVC brings ``ingest`` and ``prepare`` up to
    date; if the prepared dataset's hash equals the champion's, retraining is skipped.

    ``force`` skips the data check only: DVC still skips a stage whose inputs are unchanged
    (the same inputs give the same model), so a forced run with nothing changed registers
    nothing and says so (status ``unchanged``).

    ``epochs`` overrides ``train.epochs`` as a DVC experiment, ``dvc exp run --temp -S
    train.epochs=N -S mlflow.register_experiments=true``: it is recorded as one (``dvc exp
    show``), it registers its model for the gate, and the checkout's ``params.yaml`` and
    outputs are left as they were.
    """
    root = str(Path(root).resolve())
    cfg = load_params(Path(root) / "params.yaml")
    overrides = []
    if epochs is not None:  # validate the override before any work
        parse_params({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "epochs": epochs}})
        overrides = [f"++train.epochs={epochs}", "++mlflow.register_experiments=true"]
    if not cfg.mlflow.enabled:
        raise ConfigError("mlflow.enabled: vae-retrain needs the MLflow registry; set it true")
    stages = stage_order(root)
    if PREPARE not in stages or REGISTER not in stages:
        raise ValueError(f"dvc.yaml must have stages {PREPARE!r} and {REGISTER!r}: {stages}")
    _log_code(root)
    with _locks(root, cfg):
        return _retrain(root, cfg, stages, force, overrides)


@contextlib.contextmanager
def _locks(root: str, cfg: Config) -> Iterator[None]:
    """This checkout's lock, then the model's: the same order in both flows."""
    timeout, model = cfg.schedule.timeout_seconds, cfg.mlflow.registered_model
    with workspace_lock(root, timeout), retrain_lock(model, timeout):
        get_run_logger().info("holding the retraining lock of %s", model)
        try:
            yield
        finally:
            get_run_logger().info("released the retraining lock of %s", model)


def _log_code(root: str) -> None:
    """Which code this run is: the ``vae`` it imported, and the checkout's commit."""
    import vae

    commit = subprocess.run(
        ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    where = Path(vae.__file__).resolve().parent
    get_run_logger().info("vae %s from %s; %s at commit %s", vae.__version__, where, root, commit)


def _retrain(
    root: str, cfg: Config, stages: list[str], force: bool, overrides: list[str]
) -> dict[str, Any]:
    name, uri = cfg.mlflow.registered_model, tracking_uri(root)
    timeout = cfg.schedule.timeout_seconds
    check_data(root, timeout)
    data_stages = stages[: stages.index(PREPARE) + 1]
    ran = {s: _run(s, root, cfg) for s in data_stages}
    dataset = load_json(Path(root) / MANIFEST)["dataset_sha256"]
    champion = read_versions(name, uri, {"champion": "champion"})["champion"]
    champion_data = champion["tags"].get("dataset_sha256") if champion else None
    if champion_data == dataset and not force:
        reason = f"the dataset is unchanged since champion v{champion['version']} ({dataset[:12]})"
        get_run_logger().info("skipping retraining: %s", reason)
        return _outcome("skipped", reason, dataset, ran, champion)

    experiment = None
    if overrides:
        from prefect.runtime import flow_run

        experiment = f"retrain-{flow_run.get_name() or 'run'}-{str(flow_run.get_id())[:8]}"
        decision = run_experiment(root, experiment, overrides, timeout)
        ran["experiment"] = True
    else:
        ran.update({s: _run(s, root, cfg) for s in stages if s not in data_stages})
        if not ran[REGISTER]:  # metrics/registry.json is the previous registration's
            reason = "DVC found every input of `register` unchanged since it last ran; nothing new"
            return _outcome("unchanged", reason, dataset, ran, champion)
        decision = load_json(Path(root) / REGISTRY_RECORD)
    if not decision.get("registered", True):  # an experiment that was told not to register
        return _outcome("not registered", decision["reason"], dataset, ran, champion)
    refs = {"champion": decision["previous_champion_version"], "challenger": decision["version"]}
    versions = read_versions(name, uri, refs)
    if versions["champion"] is not None and decision["champion_nll_iw"] is not None:
        # What the gate compared: re-scored if the champion was tested on other data.
        versions["champion"]["tags"]["nll_iw"] = str(decision["champion_nll_iw"])
    status = "promoted" if decision["promoted"] else "kept"
    links = read_run_links(uri, decision["run_id"])
    extra = {"run_id": decision["run_id"], "experiment": experiment, "links": links}
    return _outcome(status, decision["reason"], dataset, ran, **versions, **extra)


def _outcome(
    status: str,
    reason: str,
    dataset: str,
    stages: dict[str, bool],
    champion: dict[str, Any] | None,
    challenger: dict[str, Any] | None = None,
    run_id: str | None = None,
    experiment: str | None = None,
    links: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Publish the report artifacts and return the flow's result.

    ``champion`` is the champion the challenger was measured against (or the current one when
    nothing was registered); the one in office afterwards is ``champion_version``.
    """
    from prefect.artifacts import (
        create_image_artifact,
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    now = challenger if status == "promoted" else champion
    result = {
        "status": status,
        "reason": reason,
        "champion_version": now["version"] if now else None,
        "challenger_version": challenger["version"] if challenger else None,
        "dataset_sha256": dataset,
        "stages": stages,
        "run_id": run_id,
        "experiment": experiment,
    }
    markdown = retrain_markdown(result, champion, challenger, links)
    description = "vae-retrain: champion vs challenger and the promotion decision"
    create_markdown_artifact(markdown, key=REPORT_KEY, description=description)
    table = metrics_table(champion, challenger)
    create_table_artifact(table, key=TABLE_KEY, description="test metrics: champion, challenger")
    if links and links["samples"].startswith(("http://", "https://")):
        create_image_artifact(
            links["samples"], key=SAMPLES_KEY, description="the challenger's sample grid"
        )
    if links:
        create_link_artifact(
            links["run"],
            link_text=f"MLflow run {run_id}",
            key="vae-retrain-run",
            description="the challenger's MLflow run",
        )
    return result
