"""Interruptions, atomic outputs and safe loading, each shown by a test."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import write_idx_dataset, write_params
from vae.atomic import atomic_open, atomic_write_json
from vae.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these

REPO = Path(__file__).resolve().parents[2]


def test_every_torch_load_is_weights_only() -> None:
    offenders = []
    for path in [*REPO.glob("vae/**/*.py"), *REPO.glob("pipelines/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and getattr(node.func.value, "id", "") == "torch"
            ):
                ok = any(
                    k.arg == "weights_only" and getattr(k.value, "value", None) is True
                    for k in node.keywords
                )
                if not ok:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(target, "w") as f:
        f.write('{"v": 2, "half')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"], "no temporary file is left"


def _vae(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "vae", "-q", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_mid_write(
    root: Path, args: list[str], out: Path, whole: Callable[[Path], None], rounds: int = 3
) -> None:
    """SIGKILL `vae <args>` while it writes an output, proven by its temporary sibling
    existing at the kill; then every output file left in ``out`` must be whole.

    Round r kills at the (r+1)-th temporary file the run creates, so the rounds hit different
    files. Temporary siblings (dot files, never read by a stage) are cleared between rounds.
    """
    landed = 0
    for r in range(rounds):
        for stale in out.glob(".*") if out.exists() else []:
            stale.unlink()
        proc = _vae(root, *args)
        seen: set[str] = set()
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            temps = {p.name for p in out.glob(".*")} if out.exists() else set()
            seen |= temps
            if len(seen) > r and temps:
                proc.send_signal(signal.SIGKILL)
                landed += 1
                break
            time.sleep(0.001)
        proc.wait(timeout=30)
        for path in out.glob("*") if out.exists() else []:
            if not path.name.startswith("."):
                whole(path)
    print(f"{args}: {landed} of {rounds} kills landed mid-write")
    assert landed >= 1, f"no SIGKILL landed while `vae {' '.join(args)}` was writing"


def _tiny_slow_project(root: Path) -> Path:
    """Enough steps per epoch (~0.2 s) that a kill lands mid-epoch."""
    write_idx_dataset(root / "data" / "raw", n_train=1200, n_test=50)
    write_params(root / "params.yaml", train={"epochs": 5, "batch_size": 8})
    assert _vae(root, "prepare").wait(timeout=120) == 0
    return root


def test_sigkill_during_train_resumes_to_the_same_result(tmp_path: Path) -> None:
    killed = _tiny_slow_project(tmp_path / "killed")
    clean = _tiny_slow_project(tmp_path / "clean")
    ckpt = killed / "models" / "checkpoint.pt"
    proc = _vae(killed, "train")
    deadline, seen = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None and seen < 2:
        seen = load_checkpoint(ckpt)["epoch"] if ckpt.exists() else 0
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # No newer checkpoint: the kill landed between two checkpoints, in the middle of a run.
    assert load_checkpoint(ckpt)["epoch"] == seen
    assert _vae(killed, "train").wait(timeout=300) == 0
    assert _vae(clean, "train").wait(timeout=300) == 0
    a = torch.load(killed / "models/model.pt", weights_only=True)
    b = torch.load(clean / "models/model.pt", weights_only=True)
    for name, tensor in b["model"].items():
        assert torch.equal(a["model"][name], tensor), name
    ma = json.loads((killed / "metrics/train.json").read_text())
    mb = json.loads((clean / "metrics/train.json").read_text())
    timing = {"seconds_per_epoch", "train_images_per_second"}
    assert {k: v for k, v in ma.items() if k not in timing} == {
        k: v for k, v in mb.items() if k not in timing
    }


def test_sigkill_during_prepare_leaves_no_partial_file(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "data" / "raw", n_train=3000, n_test=500)
    write_params(tmp_path / "params.yaml")

    def whole(path: Path) -> None:
        if path.suffix == ".pt":
            obj = torch.load(path, weights_only=True)
            assert obj["images"].shape[0] == obj["labels"].shape[0]
        else:
            json.loads(path.read_text())

    _kill_mid_write(tmp_path, ["prepare"], tmp_path / "data" / "prepared", whole)


@pytest.mark.parametrize("stage", ["export", "generate"])
def test_sigkill_during_export_or_generate_leaves_no_partial_file(
    tmp_path: Path, stage: str
) -> None:
    import pandas as pd
    from PIL import Image

    write_idx_dataset(tmp_path / "data" / "raw", n_train=2000, n_test=400)
    write_params(tmp_path / "params.yaml", train={"epochs": 1})
    for step in ("prepare", "train"):
        args = ["prepare"] if step == "prepare" else [step]
        assert _vae(tmp_path, *args).wait(timeout=300) == 0

    def whole(path: Path) -> None:
        if path.suffix == ".parquet":
            assert len(pd.read_parquet(path)) > 0
        else:
            with Image.open(path) as im:
                im.load()

    out = tmp_path / ("data/embeddings" if stage == "export" else "reports")
    _kill_mid_write(tmp_path, [stage], out, whole)


def test_unexpected_exception_exits_70_with_its_traceback(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import vae.cli

    def broken(cfg: object, args: object) -> None:
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setattr(vae.cli, "cmd_prepare", broken)
    monkeypatch.setattr(sys, "argv", ["vae", "-q", "prepare"])
    with pytest.raises(SystemExit) as info:
        vae.cli.run()
    assert info.value.code == vae.errors.EXIT_SOFTWARE == 70  # retryable, unlike 1 and 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug, not bad input" in err
    monkeypatch.setattr(sys, "argv", ["vae", "-q", "train", "--data", "nowhere"])
    with pytest.raises(SystemExit) as info:  # an expected failure: one line, code 1
        vae.cli.run()
    assert info.value.code == 1 and "Traceback" not in capsys.readouterr().err

    def interrupted(cfg: object, args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(vae.cli, "cmd_prepare", interrupted)
    monkeypatch.setattr(sys, "argv", ["vae", "-q", "prepare"])
    with pytest.raises(SystemExit) as info:  # Ctrl-C: the shell's 128 + SIGINT
        vae.cli.run()
    assert info.value.code == 130


def test_failed_download_exits_75(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import torchvision.datasets

    from vae.cli import main
    from vae.errors import EXIT_TEMPFAIL

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", data={"source": str(tmp_path / "nowhere")})
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    out = tmp_path / "download"
    assert main(["-q", "download", "--out", str(out)]) == EXIT_TEMPFAIL == 75  # retry later
    assert "no network" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir()), "a failed download leaves nothing"
    assert main(["-q", "ingest"]) == 1  # the source is missing: a retry cannot fix that
    err = capsys.readouterr().err
    assert f"data.source: {tmp_path / 'nowhere'} not found" in err and "vae download" in err
