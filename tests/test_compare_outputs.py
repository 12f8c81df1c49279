"""benchmarks/compare_outputs.py, which the move's before/after `dvc repro` check used: equal
folders are `same` everywhere (timings and ids may differ), one changed weight is not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.conftest import REPO


def _outputs(root: Path, weight: float, seconds: float) -> Path:
    for sub in ("models", "metrics", "plots", "data/embeddings", "reports"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.full((2, 2), weight)}, "epoch": 3}, root / "models/model.pt")
    torch.save({"state": {"b": torch.ones(3)}}, root / "models/classifier.pt")
    save_file({"means": torch.zeros(2, 4)}, str(root / "models/sampler.safetensors"))
    record = {"nll_iw": 99.5, "seconds": seconds, "sets": [{"fid": 3.0}], "run_id": str(seconds)}
    (root / "metrics/eval.json").write_text(json.dumps(record))
    (root / "plots/train.csv").write_text(f"epoch,val_nelbo,seconds\n1,100.0,{seconds}\n")
    (root / "data/embeddings/test.parquet").write_bytes(b"table")
    (root / "reports/samples.png").write_bytes(b"png")
    return root


def _compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    script = REPO / "benchmarks" / "compare_outputs.py"
    return subprocess.run([sys.executable, script, a, b], capture_output=True, text=True)


def test_same_outputs_with_other_timings_and_ids_are_the_same(tmp_path: Path) -> None:
    out = _compare(_outputs(tmp_path / "a", 1.0, 1.5), _outputs(tmp_path / "b", 1.0, 7.0))
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(out.stdout.splitlines()) == 7 and "DIFFERS" not in out.stdout


def test_one_changed_weight_differs(tmp_path: Path) -> None:
    out = _compare(_outputs(tmp_path / "a", 1.0, 1.5), _outputs(tmp_path / "b", 1.0 + 1e-7, 1.5))
    assert out.returncode == 1
    assert "DIFFERS models/model.pt" in out.stdout and "same metrics/eval.json" in out.stdout
