"""Where a run comes from: the DVC experiment that runs it, DVC's hashes of its data, and that
data as the run's MLflow dataset inputs.

DVC runs every stage command with ``DVC_ROOT`` (the project; for ``dvc exp run --temp`` and
queued experiments, the original project, not the temporary copy under ``.dvc/tmp/exps``) and
``DVC_STAGE``; an experiment also gets ``DVC_EXP_NAME`` and ``DVC_EXP_BASELINE_REV``. The MLflow
run is tagged with them, so a row of ``dvc exp show`` can be found in MLflow and back, and with
the hashes DVC recorded in ``dvc.lock`` for the raw data and the prepared splits.

Nothing here imports DVC: ``dvc.lock`` is plain YAML. Each split a stage reads is a dataset
input of the run (:func:`dataset_input`): its digest is DVC's hash of the split's file (the md5
that the ``.dir`` manifest of ``data/prepared`` lists; MLflow caps a digest at 36 characters),
its source ``data.source``.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "SPLIT_CONTEXTS",
    "data_hashes",
    "dataset_input",
    "dvc_root",
    "experiment_name",
    "experiment_tags",
    "run_tags",
    "under_dvc",
]


def dvc_root() -> Path | None:
    """The project DVC runs this command for, or None outside DVC."""
    root = os.environ.get("DVC_ROOT")
    return Path(root) if root else None


def under_dvc() -> bool:
    """True when DVC runs this command as a stage (``dvc repro``, ``dvc exp run``)."""
    return bool(os.environ.get("DVC_STAGE"))


def experiment_name() -> str | None:
    """The DVC experiment this stage runs in, or None for ``dvc repro`` and manual commands."""
    return os.environ.get("DVC_EXP_NAME") or None


def experiment_tags() -> dict[str, str]:
    """MLflow tags naming the DVC experiment and its baseline commit (empty outside one)."""
    tags = {}
    if name := experiment_name():
        tags["dvc.exp_name"] = name
    if rev := os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.exp_baseline_rev"] = rev
    return tags


def _entry(lock: dict[str, Any], stage: str, kind: str, path: str | None = None) -> Any:
    for item in (lock.get("stages", {}).get(stage) or {}).get(kind) or []:
        if path is None or item.get("path") == path:
            return item
    return None


def data_hashes(lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """DVC's record of the data a stage reads, as MLflow tags (empty if not recorded).

    ``dvc.source`` and ``dvc.source.md5``: the raw data's folder and DVC's hash of it (the
    ``ingest`` stage's dependency); ``dvc.raw.md5``: the cached copy (``data/raw``);
    ``dvc.prepared.md5``: the prepared splits that training reads (``data/prepared``).
    """
    try:
        lock = yaml.safe_load(Path(lock_file).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    tags = {}
    ingest = (lock.get("stages", {}).get("ingest") or {}).get("deps") or []
    source = next((d for d in ingest if not str(d.get("path", "")).startswith("vae/")), None)
    if source:
        tags["dvc.source"] = str(source["path"])
        tags["dvc.source.md5"] = str(source.get("md5", ""))
    if raw := _entry(lock, "ingest", "outs", "data/raw"):
        tags["dvc.raw.md5"] = str(raw.get("md5", ""))
    if prepared := _entry(lock, "prepare", "outs", "data/prepared"):
        tags["dvc.prepared.md5"] = str(prepared.get("md5", ""))
    return {k: v for k, v in tags.items() if v}


def run_tags() -> dict[str, str]:
    """The tags a run and its registered version carry: the DVC experiment, and DVC's hashes of
    the data as ``dvc.lock`` recorded them when DVC ran the upstream stages (a command run by
    hand has no such record, so none)."""
    return {**experiment_tags(), **(data_hashes() if under_dvc() else {})}


SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


@cache
def file_md5(path: Path) -> str:
    """The md5 of a file's bytes: DVC's hash of a (binary) file."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_input(split: str, prepared: Path, manifest: dict[str, Any], source: str) -> Any:
    """The prepared ``split`` as an MLflow ``DatasetInput``, tagged with its context (training,
    validation or test). Its name is ``DATASET-SPLIT``; its profile the image count and shape."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    info = manifest["splits"][split]
    profile = {
        "images": info["count"],
        "shape": info["shape"][1:],
        "binarize": manifest["binarize"],
    }
    dataset = Dataset(
        name=f"{manifest['dataset']}-{split}",
        digest=file_md5((prepared / f"{split}.pt").resolve()),
        source_type="local",
        source=json.dumps({"uri": source}),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, [InputTag("mlflow.data.context", SPLIT_CONTEXTS[split])])
