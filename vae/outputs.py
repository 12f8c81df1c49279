"""Where the pipeline's files live, and which of them each stage logs into the MLflow run.

The folders are the layout dvc.yaml declares (every command can override them). Each stage that
logs to MLflow has one :class:`StageRecord` in :data:`STAGE_RECORDS`: the stage uses it to log,
and ``vae log-run`` uses the same table to re-send every stage's record after a tracking outage,
so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST",
    "METRICS",
    "MODELS",
    "PLOTS",
    "PREPARED",
    "RAW",
    "REGISTRY_RECORD",
    "REPORTS",
    "RUN_FILE",
    "STAGE_RECORDS",
    "StageRecord",
]

RAW = Path("data/raw")
PREPARED = Path("data/prepared")
MANIFEST = PREPARED / "manifest.json"  # what prepare read: the dataset's sha256, its counts
MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")
REPORTS = Path("reports")
RUN_FILE = "mlflow_run.json"  # in models/: the MLflow run id, handed from stage to stage
REGISTRY_RECORD = METRICS / "registry.json"  # the last registration's decision


@dataclass(frozen=True)
class StageRecord:
    """What one stage logs: the metrics file it writes in ``metrics/`` (None: it logs no
    metrics), the keys of that file it logs (None: all of them), and its artifacts, each a
    folder name (``metrics``, ``plots``, ``reports``, ``models``) and a glob inside it, and the
    split its metrics measure (``dataset``): they are logged against the run's logged model and
    that split's dataset input, so MLflow's Models tab shows them."""

    metrics: str | None
    artifacts: tuple[tuple[str, str], ...]
    keys: tuple[str, ...] | None = None
    dataset: str | None = None

    def logged_metrics(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The part of the stage's metrics dict that goes to MLflow."""
        if self.keys is None:
            return dict(record)
        return {k: record[k] for k in self.keys if record.get(k) is not None}

    def artifact_paths(self, folders: Mapping[str, Path]) -> list[Path]:
        """The artifacts that exist, in ``folders`` (folder name -> the command's path)."""
        found: list[Path] = []
        for folder, pattern in self.artifacts:
            found += sorted(Path(folders[folder]).glob(pattern))
        return found


STAGE_RECORDS: dict[str, StageRecord] = {
    "train": StageRecord("train.json", (("plots", "train.csv"),), dataset="val"),
    "evaluate": StageRecord("eval.json", (("metrics", "eval.json"),), dataset="test"),
    "export": StageRecord("downstream.json", (("metrics", "downstream.json"),), dataset="test"),
    "generate": StageRecord(None, (("reports", "*.png"), ("models", "sampler.safetensors"))),
    "score": StageRecord("quality.json", (("metrics", "quality.json"),), dataset="test"),
    "register": StageRecord(
        "registry.json", (("metrics", "registry.json"),), keys=("version", "promoted")
    ),
}
