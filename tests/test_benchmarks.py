"""The benchmark scripts run end to end (on tiny data); their figures are not checked here.

Speed targets are measured by ``benchmarks/throughput.py`` on a real machine, not asserted in
tests: this only keeps the scripts from rotting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_idx_dataset, write_params
from vae.cli import main

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/m.db"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_throughput_and_profile_scripts_run(project: Path) -> None:
    # 400 images, so the default batch of 256 fits the train split; the default data params,
    # which row (d), the `vae train` command on the default params, checks the data against
    write_idx_dataset(project / "data" / "raw", n_train=400, n_test=50)
    write_params(project / "params.yaml", data={"val_fraction": 0.1})
    assert main(["-q", "prepare"]) == 0
    data, raw = project / "data" / "prepared", project / "data" / "raw"

    out = project / "results.json"
    bench = ROOT / "benchmarks" / "throughput.py"
    args = [str(bench), "--quick", "--data", str(data), "--raw", str(raw), "--out", str(out)]
    proc = _run([*args, "--eval-images", "20"], project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == {"a", "b", "c", "d", "e100", "e1000"}
    assert all(r["ok"] for r in rows.values())
    assert set(results["ratios"]) == {"b_over_a", "c_over_a"}
    for name in ("a", "b", "c"):  # 1 warm-up + 1 timed epoch, each with a finite -ELBO
        assert len(rows[name]["val_nelbo"]) == 2 and 0 < rows[name]["final_val_nelbo"] < 1e4
    assert "| (c) vae.training.train, default params |" in proc.stdout

    profile = ROOT / "benchmarks" / "profile_train.py"
    proc = _run([str(profile), "--params", "params.yaml", "--data", str(data)], project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "aten::addmm" in proc.stdout and "of CPU self time = GEMM" in proc.stdout


def test_sampler_spread_script_runs(project: Path) -> None:
    for stage in ("prepare", "train", "generate"):
        assert main(["-q", stage]) == 0, stage
    script = ROOT / "benchmarks" / "sampler_spread.py"
    proc = _run([str(script), ".", "--temperatures", "1", "1.2", "-n", "200"], project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("codes: ") and "active dimensions" in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == ["t = 1", "t = 1.2"]


def test_epoch_images_script_runs(project: Path) -> None:
    assert main(["-q", "prepare"]) == 0
    proc = _run([str(ROOT / "benchmarks" / "epoch_images.py"), "--epochs", "2"], project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert report["epochs"] == 2 and report["failures"] == 0
    assert report["loop_seconds_per_pair"] > 0 and report["upload_seconds_per_pair"] > 0


# What a GPU machine lacks: its image has torch and pyyaml, but none of the project's services.
_ABSENT_ON_A_GPU_MACHINE = ("mlflow", "dvc", "prefect", "pandas", "pyarrow", "sklearn", "PIL")


def test_gpu_frontier_script_runs_with_torch_and_yaml_alone(project: Path) -> None:
    """benchmarks/gpu_frontier.py on the CPU, shrunk, with the packages a GPU machine lacks made
    unimportable: the conv-hvae preset trains for its time, then K samples score the test set."""
    write_idx_dataset(project / "data" / "raw", n_train=200, n_test=30)
    assert main(["-q", "prepare"]) == 0
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in _ABSENT_ON_A_GPU_MACHINE)
    script = ROOT / "benchmarks" / "gpu_frontier.py"
    args = ["--device", "cpu", "--minutes", "0.05", "--iw-samples", "8", "--images", "10"]
    args += ["--skip-throughput", "--data", "data/prepared", "--out", "out"]
    for setting in ("model.conv_channels=2", "model.hidden_dim=8", "model.pseudo_inputs=4"):
        args += ["--set", setting]
    args += ["--set", "train.batch_size=32"]
    run = f"import runpy, sys; {block}; sys.argv = ['x', *{args!r}]; "
    run += f"runpy.run_path({str(script)!r}, run_name='__main__')"
    proc = _run(["-c", run], project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((project / "out" / "gpu_frontier.json").read_text())
    assert report["preset"] == "conv-hvae" and report["epochs"] >= 1
    ev = report["evaluation"]
    assert ev["iw_samples"] == 8 and ev["n_images"] == 10 and 0 < ev["nll_iw"] <= -ev["elbo"]
    assert "conv-hvae on cpu:" in proc.stdout and "nats at K = 8" in proc.stdout


def test_epoch_time_script_runs(project: Path) -> None:
    write_idx_dataset(project / "data" / "raw", n_train=300, n_test=20)
    assert main(["-q", "prepare"]) == 0
    script = ROOT / "benchmarks" / "epoch_time.py"
    args = [str(script), "default", "hvae", "--epochs", "1", "--data", "data/prepared"]
    proc = _run([*args, "--set", "train.batch_size=64"], project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["| default", "| hvae"]
    assert [r[2] for r in rows] == ["70", "550"]  # params.yaml's epochs, and the preset's
    assert all(float(r[1]) > 0 for r in rows)


def test_flops_script_counts_each_preset() -> None:
    proc = _run([str(ROOT / "benchmarks" / "flops.py"), "default", "conv-hvae"], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"default", "conv-hvae"}
    mlp, conv = (float(rows[n][2].removesuffix(" M").replace(",", "")) for n in rows)
    assert 1 < mlp < 2 and conv > 100 * mlp  # the gated MLP, and the ConvHVAE for a GPU
