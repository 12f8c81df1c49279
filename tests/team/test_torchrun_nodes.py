"""``vae train`` across two nodes, as a team with two machines runs it from the pipeline.

Two clones of the team's project ("machines"), each with its data from ``dvc pull`` off the
team's S3 remote. ``train.nnodes: 2`` in params.yaml: node A runs the DVC stage (``dvc repro
train``), whose ``vae train`` launches torchrun with a c10d rendezvous on 127.0.0.1; node B runs
``vae train --join``. Gloo and the rendezvous stay on loopback (``ss -tnp``); only node A writes.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import dvc, free_port
from tests.team.conftest import TeamProject, clone, outside_loopback, process_tree

pytestmark = [pytest.mark.team, pytest.mark.slow]
# As tests/training/test_distributed.py: the same global batches and noise, so the two runs
# differ only by the order of floating-point sums.
RTOL = 1e-4
TRAIN = {"epochs": 60, "batch_size": 8}  # ~0.25 s an epoch: time to lose a node mid-run


def _params(root: Path, **train: object) -> dict:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(TRAIN, **train)
    return params


def _start(root: Path, env: dict[str, str], *cmd: str) -> subprocess.Popen:
    """``cmd`` in ``root``, in a session of its own (a machine: killed as a whole)."""
    return subprocess.Popen(
        list(cmd),
        cwd=root,
        env={**env, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _rows(path: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(path.open())]


@pytest.fixture
def nodes(team_project: TeamProject, tmp_path: Path) -> tuple[Path, Path]:
    """Nodes A and B: clones that pulled their data, with train.nnodes: 2 in params.yaml."""
    env = team_project.env("writer")
    a, b = clone(team_project, tmp_path / "node-a"), clone(team_project, tmp_path / "node-b")
    endpoint = f"127.0.0.1:{free_port()}"
    for root in (a, b):
        print(root.name, dvc(root, "pull", env=env).strip().splitlines()[-1])
        params = _params(root, nnodes=2, rdzv_endpoint=endpoint)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return a, b


def test_two_nodes_train_as_one_process_and_a_lost_node_resumes(
    team_project: TeamProject, nodes: tuple[Path, Path]
) -> None:
    a, b = nodes
    env = team_project.env("writer")
    # One process, the same params otherwise: the trajectory the two nodes must follow
    (a / "one.yaml").write_text(yaml.safe_dump(_params(a, nnodes=1), sort_keys=False))
    folders = ["--models", "one", "--metrics", "one", "--plots", "one"]
    one = subprocess.run(
        [sys.executable, "-m", "vae", "-q", "--params", "one.yaml", "train", *folders],
        cwd=a,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    # Lose node B (its launcher, torchrun and the training process) after two epochs
    join = [sys.executable, "-m", "vae", "train", "--join"]
    node_b = _start(b, env, *join)
    node_a = _start(a, env, "dvc", "repro", "train")
    ckpt = a / "models" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() or torch.load(ckpt, weights_only=False)["epoch"] < 2:
        assert node_a.poll() is None and time.monotonic() < deadline, node_a.communicate()[0]
        time.sleep(0.2)
    tree_a = process_tree([node_a.pid])
    os.killpg(node_b.pid, signal.SIGKILL)
    lost = time.monotonic()
    out_a, _ = node_a.communicate(timeout=120)
    print(f"node A's dvc repro failed {time.monotonic() - lost:.1f} s after node B was lost")
    node_b.communicate()
    assert node_a.returncode != 0
    assert "vae train: error: torchrun exited with 1: a training process or a node" in out_a
    assert "failed to reproduce 'train'" in out_a
    time.sleep(1)
    assert not process_tree(list(tree_a)), "node A's training processes outlived the run"
    assert not (b / "models" / "checkpoint.pt").exists()  # only node A writes
    epoch = torch.load(ckpt, weights_only=False)["epoch"]

    # Both again: node A resumes from its checkpoint and sends it to node B
    node_b = _start(b, env, *join)
    node_a = _start(a, env, "dvc", "repro", "train")
    bad: list[str] = []
    while node_a.poll() is None:
        bad += outside_loopback(process_tree([node_a.pid, node_b.pid]))
        time.sleep(0.5)
    out_a, _ = node_a.communicate()
    out_b, _ = node_b.communicate(timeout=60)
    assert node_a.returncode == 0, out_a[-3000:]
    assert node_b.returncode == 0, out_b[-3000:]
    assert not bad, bad
    assert f"resuming from models/checkpoint.pt at epoch {epoch}" in out_a, out_a[-3000:]
    assert "joining a 2-node x 1-process training" in out_b
    print(f"resumed at epoch {epoch}; node A:", *[ln for ln in out_a.splitlines() if "best" in ln])

    rows_one, rows_two = _rows(a / "one" / "train.csv"), _rows(a / "plots" / "train.csv")
    assert len(rows_one) == len(rows_two) == TRAIN["epochs"]
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        for key in ("train_loss", "train_recon", "train_kl", "val_nelbo"):
            assert abs(r1[key] - r2[key]) <= RTOL * abs(r1[key]), (r1["epoch"], key, r1, r2)
    w1 = torch.load(a / "one" / "model.pt", weights_only=True)["model"]
    w2 = torch.load(a / "models" / "model.pt", weights_only=True)["model"]
    for name, tensor in w1.items():
        torch.testing.assert_close(w2[name], tensor, rtol=1e-3, atol=1e-4)
    assert yaml.safe_load((a / "metrics" / "train.json").read_text())["world_size"] == 2
    # node B changed nothing but its params.yaml: no checkpoint, model or metrics of its own
    status = subprocess.run(["git", "status", "--porcelain"], cwd=b, capture_output=True, text=True)
    assert status.stdout.split() == ["M", "params.yaml"], status.stdout
    assert not (b / "models" / "checkpoint.pt").exists()
