"""The summaries dvc exp show reads: the compared numbers of each record, and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from vae.evaluation.summary import SUMMARIES, summarize, write_summary

REPO = Path(__file__).resolve().parents[2]
EVAL = {
    "elbo": -231.0,
    "kl": 16.14404,
    "kl_estimator": "monte_carlo_500_samples",
    "nll_iw": 229.170087924758,
    "elbo_gap": 1.829,
    "active_units": 17,
    "kl_per_layer": None,
    "seconds": 61.08,
}
QUALITY = {
    "sampler": "diffusion",
    "temperature": 1.2,
    "seconds": 57.4,
    "feature_net_sha256": "3268",
    "sets": {
        "diffusion_mean": {"fid": 113.45, "precision": 0.95, "recall": 0.09, "n": 10000},
        "diffusion_mean_t1.2": {"fid": 77.220981, "precision": 0.9296, "recall": 0.1662},
    },
}


def test_a_summary_holds_the_compared_numbers_rounded_and_no_timing_or_string() -> None:
    assert summarize("eval.json", EVAL) == {
        "nll_iw": 229.1701,
        "elbo_gap": 1.829,
        "kl": 16.144,
        "active_units": 17,
    }
    assert summarize("quality.json", QUALITY) == {
        "fid": 77.221,
        "precision": 0.9296,
        "recall": 0.1662,
    }  # the chosen sampler at the chosen temperature, whose set name holds a dot
    at_one = summarize("quality.json", {**QUALITY, "temperature": 1.0})
    assert at_one["fid"] == 113.45
    down = {"knn_accuracy": 0.865, "linear_probe_accuracy": None, "knn_seconds": 4.0}
    assert summarize("downstream.json", down) == {"knn": 0.865}  # no probe: left out


def test_write_summary_writes_beside_the_record(tmp_path: Path) -> None:
    path = write_summary(tmp_path, "eval.json", EVAL)
    assert path == tmp_path / "summary" / "eval.json"
    assert json.loads(path.read_text())["nll_iw"] == 229.1701


def test_dvc_reads_the_summaries_as_metrics_and_their_names_are_unique() -> None:
    """Every summary is a metric of the stage that writes its record, and no column name is
    in two files (DVC would prefix it with the file's path and widen the table)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = {
        next(iter(m)) if isinstance(m, dict) else m
        for spec in stages.values()
        for m in spec.get("metrics", [])
    }
    assert declared == {f"metrics/summary/{name}" for name in SUMMARIES}
    columns = [column for spec in SUMMARIES.values() for column, _ in spec]
    assert len(columns) == len(set(columns))
    committed = {name: json.loads((REPO / "metrics" / name).read_text()) for name in SUMMARIES}
    for name, record in committed.items():
        assert set(summarize(name, record)) == {c for c, _ in SUMMARIES[name]}, name
