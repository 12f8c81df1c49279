"""DistributedDataParallel on the CPU (gloo): 2 processes follow the single-process trajectory."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import write_idx_dataset, write_params

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these

# Both runs see the same global batches and the same noise (drawn for the global batch and
# sliced per rank), so they differ only by floating-point summation order (gradients averaged
# across ranks vs. one larger reduction): per-epoch losses agree to 1e-4 relative.
RTOL = 1e-4


def _run(root: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _rows(path: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(path.open())]


def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "data" / "raw", n_train=200, n_test=20)
    write_params(tmp_path / "params.yaml", train={"epochs": 3, "batch_size": 32})
    _run(tmp_path, "-m", "vae", "-q", "prepare")
    _run(
        tmp_path, "-m", "vae", "-q", "train", "--models", "one", "--plots", "p1", "--metrics", "m1"
    )
    _run(
        tmp_path,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "vae",
        "-q",
        "train",
        "--models",
        "two",
        "--plots",
        "p2",
        "--metrics",
        "m2",
    )
    one, two = _rows(tmp_path / "p1/train.csv"), _rows(tmp_path / "p2/train.csv")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        for key in ("train_loss", "train_recon", "train_kl", "val_nelbo"):
            assert abs(a[key] - b[key]) <= RTOL * abs(a[key]), (key, a[key], b[key])
    wa = torch.load(tmp_path / "one/model.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two/model.pt", weights_only=True)["model"]
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=1e-3, atol=1e-4)
    # only rank 0 wrote: one checkpoint, one metrics file, no stray temporary files
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "checkpoint.pt",
        "mlflow_run.json",
        "model.pt",
    ]
