"""MLflow tracking behind the :class:`vae.training.tracking.Tracker` protocol.

This is the only module the training path imports mlflow from. One pipeline run is one MLflow
run: ``vae train`` creates it and writes its id to ``models/mlflow_run.json`` (a DVC-tracked
file); ``evaluate``, ``export``, ``generate``, ``score`` and ``register`` read that file and log
into the same run. Which store, and the client, come from :mod:`vae.mlops.store`.
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
from vae.mlops.lineage import run_tags
from vae.mlops.store import check_reachable, local_store, project_root, redact, tracking_uri

__all__ = [
    "MlflowTracker",
    "RunNotFound",
    "flatten_metrics",
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


class MlflowTracker:
    """Logs into one MLflow run through ``MlflowClient``; never touches global run state.

    A failure of the tracking server mid-run does not stop the work: after the first failed
    call the tracker stops calling (so training never waits on retries again), counts what it
    skipped, and :meth:`report` says what was lost and how to re-log it.
    """

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.failures = 0
        self.first_error: str | None = None

    def _safely(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self.first_error is not None:  # the server is gone: don't wait on it again
            self.failures += 1
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never kill training
            self.failures += 1
            self.first_error = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            log.warning(
                "MLflow %s failed (%s); the work goes on without tracking", what, self.first_error
            )

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._safely(
                "log_params", self.client.log_batch, self.run_id, params=items[i : i + 100]
            )

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._safely("set_tags", self.client.log_batch, self.run_id, tags=items)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self._safely(
                "log_metrics", self.client.log_batch, self.run_id, metrics=items[i : i + 1000]
            )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._safely(
            "log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path
        )

    def finish(self, status: str = "FINISHED") -> None:
        self._safely("set_terminated", self.client.set_terminated, self.run_id, status)

    def report(self) -> str | None:
        if not self.failures:
            return None
        return (
            f"{self.failures} MLflow call(s) failed or were skipped for run {self.run_id} "
            f"(first: {self.first_error}); the local outputs are complete. Re-log them with "
            "`vae log-run` once the server is back"
        )


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
    run_id = None
    if run_file.is_file():
        old = load_json(run_file).get("run_id")
        if old:
            try:
                run = client.get_run(old)
                same = run.data.params == {k: str(v) for k, v in params.items()}
                if run.info.status == "RUNNING" and same and run.info.experiment_id == exp_id:
                    run_id = old
                    log.info("reopening MLflow run %s", run_id)
            except Exception:  # noqa: BLE001 - deleted or from another store: start afresh
                run_id = None
    if run_id is None:
        run_id = client.create_run(exp_id, run_name=run_name).info.run_id
    tracker = MlflowTracker(client, run_id)
    atomic_write_json(
        run_file,
        {
            "run_id": run_id,
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
    client = store.client(uri)
    try:
        client.get_run(run_id)
    except Exception as exc:
        from mlflow.exceptions import MlflowException

        if not isinstance(exc, MlflowException) or exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise missing from None
    return MlflowTracker(client, run_id)


def write_disabled_run_file(run_file: Path) -> None:
    atomic_write_json(run_file, {"run_id": None})


def start_pipeline_run(
    cfg: Config, run_file: Path, manifest: dict, device: torch.device
) -> MlflowTracker | None:
    """Start (or reopen) the pipeline's MLflow run, with its params and tags; None if off."""
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
    return tracker


def log_stage(
    tracker: MlflowTracker | None, stage: str, metrics: dict, artifacts: Sequence[Path] = ()
) -> None:
    """Send the stage's metrics dict (the one written to JSON) and its artifacts to MLflow."""
    if tracker is None:
        return
    tracker.log_metrics(flatten_metrics(metrics, f"{stage}."))
    for path in artifacts:
        tracker.log_artifact(path, stage)
    if stage != "train" and (problem := tracker.report()):
        logging.getLogger("vae").warning("vae %s: %s", stage, problem)


def relog_history(tracker: MlflowTracker, history: Path) -> None:
    """Send the per-epoch rows of ``plots/train.csv`` into ``tracker``'s run, each at its epoch,
    as the training loop's tracking callback would have."""
    with open(history) as f:
        for row in csv.DictReader(f):
            epoch = int(row.pop("epoch"))
            tracker.log_metrics({k: float(v) for k, v in row.items()}, step=epoch)
