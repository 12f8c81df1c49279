"""MLflow tracking behind the :class:`vae.training.tracking.Tracker` protocol: one object that
logs into one run, and never stops the work when the server fails.

The training loop reaches MLflow only through it; which run it logs into is
:mod:`vae.mlops.pipeline_run`'s business.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["MlflowTracker"]

log = logging.getLogger(__name__)


class MlflowTracker:
    """Logs into one MLflow run through ``MlflowClient``; never touches global run state.

    A failure of the tracking server mid-run does not stop the work: after the first failed
    call the tracker stops calling (so training never waits on retries again), counts what it
    skipped, and :meth:`report` says what was lost and how to re-log it.
    """

    def __init__(self, client: Any, run_id: str, model_id: str | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.model_id = model_id  # the run's logged model (MLflow 3), created by ``vae train``
        self._monitor: Any = None
        self.failures = 0
        self.first_error: str | None = None
        self._uploads: Any = None  # one background thread for images, started on first use

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

    def log_metrics(
        self,
        metrics: dict[str, float],
        step: int | None = None,
        model_id: str | None = None,
        dataset: tuple[str, str] | None = None,
    ) -> None:
        """``model_id`` and ``dataset`` (name, digest) link the metrics to a logged model and
        the data they were measured on: the Models tab shows them."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        name, digest = dataset or (None, None)
        items = [
            Metric(k, float(v), now, step or 0, model_id, name, digest) for k, v in metrics.items()
        ]
        for i in range(0, len(items), 1000):
            self._safely(
                "log_metrics", self.client.log_batch, self.run_id, metrics=items[i : i + 1000]
            )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._safely(
            "log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path
        )

    def log_image(self, key: str, image: Any, step: int) -> None:
        """Upload the image in one background thread, in order; :meth:`flush` waits for it.

        The image is encoded there too (MLflow writes a PNG and a compressed WebP of it), so
        the training loop only hands over the array.
        """
        from concurrent.futures import ThreadPoolExecutor

        if self._uploads is None:
            self._uploads = ThreadPoolExecutor(1, thread_name_prefix="mlflow-images")
        self._uploads.submit(
            self._safely,
            "log_image",
            self.client.log_image,
            self.run_id,
            image,
            key=key,
            step=step,
            synchronous=True,
        )

    def flush(self) -> None:
        """Wait for the background uploads (images) to end."""
        if self._uploads is not None:
            self._uploads.shutdown(wait=True)
            self._uploads = None

    def begin(self) -> None:
        """Mark the run RUNNING while a stage works in it, and sample this process's CPU, memory
        (and GPU, with pynvml) into it as ``system/...`` metrics, continuing the steps of the
        stages before: MLflow's monitor, unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false."""
        import os

        self._safely("update_run", self.client.update_run, self.run_id, status="RUNNING")
        if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() in ("false", "0"):
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=True, tracking_uri=self.client.tracking_uri
            )
            self._monitor.start()
        except Exception as exc:  # noqa: BLE001 - no psutil, an old server: no system metrics
            log.warning("MLflow system metrics are off: %s", exc)
            self._monitor = None

    def finish(self, status: str = "FINISHED") -> None:
        """Wait for the uploads, stop the monitor, and end the stage's part of the run."""
        self.flush()
        if self._monitor is not None:
            self._safely("system metrics", self._monitor.finish)
            self._monitor = None
        self._safely("set_terminated", self.client.set_terminated, self.run_id, status)

    def report(self) -> str | None:
        if not self.failures:
            return None
        return (
            f"{self.failures} MLflow call(s) failed or were skipped for run {self.run_id} "
            f"(first: {self.first_error}); the local outputs are complete. Re-log them with "
            "`vae log-run` once the server is back"
        )
