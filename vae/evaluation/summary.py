"""The few numbers of each evaluation record that compare two runs: what ``dvc exp show`` reads.

The stages write their full records to ``metrics/`` (timings, counts, strings, every sample
set), where the flows, the model card and ``vae log-run`` read them. Beside each, a summary in
``metrics/summary/`` holds only the numbers a person compares runs by, under names that are
unique across the files, so DVC shows them without file prefixes. dvc.yaml declares the
summaries as its metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vae.atomic import atomic_write_json

__all__ = ["SUMMARIES", "headline_set", "summarize", "write_record", "write_summary"]

HEADLINE = "{headline}"  # in a key: the set of the chosen sampler (see headline_set)

# record file -> (column, the key's path in the record)
SUMMARIES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "eval.json": (
        ("nll_iw", ("nll_iw",)),
        ("elbo_gap", ("elbo_gap",)),
        ("kl", ("kl",)),
        ("active_units", ("active_units",)),
    ),
    "downstream.json": (("knn", ("knn_accuracy",)), ("probe", ("linear_probe_accuracy",))),
    "quality.json": (
        ("fid", ("sets", HEADLINE, "fid")),
        ("precision", ("sets", HEADLINE, "precision")),
        ("recall", ("sets", HEADLINE, "recall")),
    ),
}


def headline_set(quality: Mapping[str, Any]) -> str:
    """The set of ``metrics/quality.json`` that the chosen sampler's headline numbers are."""
    sampler, t = quality.get("sampler", "prior"), quality.get("temperature", 1.0)
    name = f"{sampler}_mean" if t == 1.0 else f"{sampler}_mean_t{t:g}"
    return name if name in quality.get("sets", {}) else f"{sampler}_mean"


def summarize(name: str, record: Mapping[str, Any]) -> dict[str, float | int]:
    """The summary of record file ``name`` (``eval.json``, ...): its compared numbers, rounded
    to 4 decimals; a number the record lacks (or holds as null) is left out."""
    headline = headline_set(record) if "sets" in record else ""
    out: dict[str, float | int] = {}
    for column, path in SUMMARIES[name]:
        value: Any = record
        for part in path:
            part = headline if part == HEADLINE else part
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[column] = value if isinstance(value, int) else round(float(value), 4)
    return out


def write_summary(metrics: Path, name: str, record: Mapping[str, Any]) -> Path:
    """Write ``metrics/summary/<name>``, the summary of the record ``metrics/<name>``."""
    path = metrics / "summary" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, summarize(name, record))
    return path


def write_record(metrics: Path, name: str, record: Mapping[str, Any]) -> None:
    """A stage's full record, ``metrics/<name>``, and its summary for ``dvc exp show``."""
    atomic_write_json(metrics / name, record)
    write_summary(metrics, name, record)
