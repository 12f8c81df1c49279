"""One pipeline run is one MLflow run: ``vae train`` creates it (and its logged model) and writes
their ids to ``models/mlflow_run.json`` (a DVC-tracked file); ``evaluate``, ``export``,
``generate``, ``score`` and ``register`` read that file and log into the same run, each stage
marking it RUNNING while it works (:mod:`vae.mlops.mlflow_tracker` logs). Which store, and the
client, come from :mod:`vae.mlops.store`.
"""

from __future__ import annotations

import csv
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vae.atomic import atomic_write_json, load_json
from vae.config import Config, MlflowConfig
from vae.errors import PermanentError
from vae.mlops import store
from vae.mlops.lineage import dataset_input, run_tags
from vae.mlops.mlflow_tracker import MlflowTracker
from vae.mlops.store import check_reachable, local_store, project_root, redact, tracking_uri
from vae.outputs import STAGE_RECORDS

__all__ = [
    "RunNotFound",
    "flatten_metrics",
    "log_datasets",
    "log_stage",
    "open_run",
    "relog_history",
    "start_pipeline_run",
    "tracker_from_run_file",
]

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class RunNotFound(PermanentError, RuntimeError):
    """The run named by ``models/mlflow_run.json`` is not in this tracking store."""


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a metrics dict as MLflow metrics; lists become ``key.0``, ..."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, (bool, int, float)):
            flat[name] = float(value)
        elif isinstance(value, (list, tuple)):
            flat.update(flatten_metrics({str(i): v for i, v in enumerate(value)}, f"{name}."))
        elif isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}."))
    return flat


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def open_run(
    cfg: MlflowConfig, run_file: Path, params: dict[str, Any], run_name: str | None = None
) -> MlflowTracker:
    """Start the pipeline's MLflow run, or reopen the one a killed ``vae train`` left running.

    A run is reused only if it is still RUNNING and logged the same params, so a resumed
    training run keeps one MLflow run, and a changed config always gets a new one.
    """
    uri = tracking_uri()
    check_reachable(uri)
    client = store.client(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    exp_id = exp.experiment_id if exp else _create_experiment(client, cfg.experiment, uri)
    run_id = model_id = None
    if run_file.is_file():
        record = load_json(run_file)
        if old := record.get("run_id"):
            try:
                run = client.get_run(old)
                same = run.data.params == {k: str(v) for k, v in params.items()}
                if run.info.status == "RUNNING" and same and run.info.experiment_id == exp_id:
                    run_id, model_id = old, record.get("model_id")
                    log.info("reopening MLflow run %s", run_id)
            except Exception:  # noqa: BLE001 - deleted or from another store: start afresh
                run_id = None
    if run_id is None:
        run_id = client.create_run(exp_id, run_name=run_name).info.run_id
    if model_id is None:  # MLflow 3's logged model: register uploads its files into it
        model_id = client.create_logged_model(
            exp_id, name="model", source_run_id=run_id, model_type="vae"
        ).model_id
    tracker = MlflowTracker(client, run_id, model_id)
    atomic_write_json(
        run_file,
        {
            "run_id": run_id,
            "model_id": model_id,
            "experiment_id": exp_id,
            "experiment": cfg.experiment,
            "tracking_uri": redact(uri),
        },
    )
    return tracker


def _create_experiment(client: Any, name: str, uri: str) -> str:
    # The project's own store keeps artifacts in <project>/mlruns. MLflow's default would be
    # ./mlruns of whichever folder first creates the experiment, and for a --temp or queued DVC
    # experiment that is a copy under .dvc/tmp/exps, deleted when the experiment ends.
    location = None
    if uri == local_store():
        location = (project_root() / "mlruns" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def tracker_from_run_file(run_file: Path) -> MlflowTracker | None:
    """The tracker for the run ``vae train`` started, or None if tracking was off.

    The run must exist in this store: a clone that pulled ``models/`` from a DVC remote may hold
    the id of a run logged to another clone's store. That is a :class:`RunNotFound` naming both
    stores, never a silent new run: the stage's records belong with the model's training run.
    """
    if not run_file.is_file():
        return None
    record = load_json(run_file)
    run_id = record.get("run_id")
    if not run_id:
        return None
    uri = tracking_uri()
    check_reachable(uri)
    missing = RunNotFound(
        f"{run_file}: MLflow run {run_id} is not in {redact(uri)}; it was logged to "
        f"{record.get('tracking_uri', 'another store')}. Point MLFLOW_TRACKING_URI at that "
        "store, run `vae train` to start a run here, or set mlflow.enabled: false"
    )
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise missing  # and opening it would leave an empty store behind
    from mlflow.exceptions import MlflowException

    client = store.client(uri)
    try:
        with store.one_line_errors(uri, f"reading MLflow run {run_id}"):  # a 5xx: exit 75
            client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise missing from None
    tracker = MlflowTracker(client, run_id, record.get("model_id"))
    tracker.begin()
    return tracker


def write_disabled_run_file(run_file: Path) -> None:
    atomic_write_json(run_file, {"run_id": None})


def start_pipeline_run(
    cfg: Config, run_file: Path, manifest: dict, device: torch.device | str, prepared: Path
) -> MlflowTracker | None:
    """Start (or reopen) the pipeline's MLflow run, with its params, tags and the training and
    validation data as its dataset inputs; None if tracking is off."""
    if not cfg.mlflow.enabled:
        write_disabled_run_file(run_file)
        return None
    import torch

    import vae

    tracker = open_run(cfg.mlflow, run_file, cfg.flat())
    tracker.log_params(cfg.flat())
    commit = git_commit()
    tracker.set_tags(
        {
            "git_commit": commit,
            "mlflow.source.git.commit": commit,
            "dataset": cfg.data.dataset,
            "dataset_sha256": manifest["dataset_sha256"],
            "device": str(device),
            "torch_version": str(torch.__version__),
            "vae_version": vae.__version__,
            **run_tags(),
        }
    )
    log_datasets(tracker, cfg, prepared, manifest, ("train", "val"))
    tracker.begin()
    return tracker


def log_datasets(
    tracker: MlflowTracker, cfg: Config, prepared: Path, manifest: dict, splits: Sequence[str]
) -> list[Any]:
    """The prepared splits as the run's dataset inputs (the runs table's Datasets column)."""
    inputs = [dataset_input(s, prepared, manifest, cfg.data.source) for s in splits]
    tracker._safely("log_inputs", tracker.client.log_inputs, tracker.run_id, datasets=inputs)
    return inputs


def log_stage(
    tracker: MlflowTracker | None,
    stage: str,
    record: dict,
    folders: dict[str, Path],
    data: tuple[Config, Path] | None = None,
    finish: bool = True,
) -> None:
    """Send the stage's record (the dict written to JSON) and its artifacts to MLflow, as
    :data:`vae.outputs.STAGE_RECORDS` says, then end the stage's part of the run (``finish``).

    With ``data`` (params and the prepared folder), the split the stage measured becomes a
    dataset input, and the metrics are the run's logged model's, measured on it.
    """
    if tracker is None:
        return
    spec, on, model_id = STAGE_RECORDS[stage], None, None
    if data is not None and spec.dataset is not None:
        cfg, prepared = data
        manifest = load_json(prepared / "manifest.json")
        (dataset,) = log_datasets(tracker, cfg, prepared, manifest, (spec.dataset,))
        on, model_id = (dataset.dataset.name, dataset.dataset.digest), tracker.model_id
    metrics = flatten_metrics(spec.logged_metrics(record), f"{stage}.")
    tracker.log_metrics(metrics, model_id=model_id, dataset=on)
    for path in spec.artifact_paths(folders):
        tracker.log_artifact(path, stage)
    if stage != "train" and (problem := tracker.report()):
        logging.getLogger("vae").warning("vae %s: %s", stage, problem)
    if finish:
        tracker.finish()


def relog_history(tracker: MlflowTracker, history: Path) -> None:
    """Send the per-epoch rows of ``plots/train.csv`` into ``tracker``'s run, each at its epoch,
    as the training loop's tracking callback would have."""
    with open(history) as f:
        for row in csv.DictReader(f):
            epoch = int(row.pop("epoch"))
            tracker.log_metrics({k: float(v) for k, v in row.items()}, step=epoch)
