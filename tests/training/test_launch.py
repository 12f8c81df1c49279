"""``vae train`` launching torchrun from params.yaml (train.nnodes, train.nproc_per_node): the
command line it builds, and what it refuses. Two real nodes: tests/team/test_torchrun_nodes.py."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS, free_port, write_idx_dataset, write_params
from vae.cli import main
from vae.config import ConfigError
from vae.params import parse_params
from vae.training.checkpoint import run_identity
from vae.training.launch import needs_launch, torchrun_command, train_argv


def _cfg(**train: object):
    return parse_params({**TINY_PARAMS, "train": {**TINY_PARAMS["train"], **train}})


def _args(**extra: object) -> argparse.Namespace:
    base = {"params": "params.yaml", "quiet": True, "data": "data/prepared"}
    base |= {"models": "models", "metrics": "metrics", "plots": "plots", "no_resume": False}
    return argparse.Namespace(**{**base, "join": False, **extra})


def test_two_nodes_on_loopback_rendezvous_there_and_fail_fast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PET_LOCAL_ADDR", raising=False)
    cfg = _cfg(nnodes=2, nproc_per_node=3, rdzv_endpoint="127.0.0.1:29555")
    cmd = torchrun_command(cfg, train_argv(_args(no_resume=True)))
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    for flag in ("--nnodes=2", "--nproc-per-node=3", "--rdzv-backend=c10d", "--max-restarts=0"):
        assert flag in cmd
    assert "--rdzv-endpoint=127.0.0.1:29555" in cmd and "--local-addr=127.0.0.1" in cmd
    assert cmd[cmd.index("-m", 3) :] == [
        "-m", "vae", "--params", "params.yaml", "-q", "train", "--data", "data/prepared",
        "--models", "models", "--metrics", "metrics", "--plots", "plots", "--no-resume",
    ]  # fmt: skip


def test_a_real_endpoint_keeps_torchruns_address_and_one_node_is_standalone() -> None:
    cmd = torchrun_command(_cfg(nnodes=4, rdzv_endpoint="node0.example.org:29400"), ["train"])
    assert "--rdzv-endpoint=node0.example.org:29400" in cmd
    assert not any(c.startswith("--local-addr") for c in cmd)
    cmd = torchrun_command(_cfg(nproc_per_node=2), ["train"])
    assert "--standalone" in cmd and not any(c.startswith("--rdzv") for c in cmd)


def test_when_vae_train_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not needs_launch(_cfg(), join=False)
    assert needs_launch(_cfg(nnodes=2), join=True)
    assert needs_launch(_cfg(nproc_per_node=2), join=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # one of torchrun's processes: it trains
    assert not needs_launch(_cfg(nnodes=2), join=False)
    with pytest.raises(ConfigError, match=r"train\.nnodes: 1"):
        needs_launch(_cfg(), join=True)


def test_the_topology_is_not_part_of_what_a_checkpoint_must_match() -> None:
    one = run_identity(_cfg(), "sha")
    assert run_identity(_cfg(nnodes=2, nproc_per_node=4, rdzv_endpoint="h:1"), "sha") == one


def test_join_without_nodes_exits_2_in_one_line(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_params(project / "params.yaml")
    assert main(["prepare"]) == 0
    capsys.readouterr()
    assert main(["train", "--join"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "vae train: error: train.nnodes: 1, so there is no run to --join; set it to the nodes"
    )
    assert not (project / "models" / "model.pt").exists()


@pytest.mark.slow
def test_nodes_with_other_data_stop_naming_it(tmp_path: Path) -> None:
    """Two nodes on this machine, one with other raw data than the leading node's: both stop."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, n_train in (("a", 100), ("b", 120)):
        write_idx_dataset(tmp_path / name / "data" / "raw", n_train=n_train, n_test=10)
        train = {"nnodes": 2, "rdzv_endpoint": endpoint}
        write_params(tmp_path / name / "params.yaml", train=train)
        prep = [sys.executable, "-m", "vae", "-q", "prepare"]
        subprocess.run(prep, cwd=tmp_path / name, env=env, check=True, timeout=300)
    cmd = [sys.executable, "-m", "vae", "-q", "train"]
    b = subprocess.Popen([*cmd, "--join"], cwd=tmp_path / "b", env=env, stderr=subprocess.PIPE)
    a = subprocess.run(cmd, cwd=tmp_path / "a", env=env, capture_output=True, timeout=300)
    err_b = b.communicate(timeout=60)[1].decode()
    for code, err in ((a.returncode, a.stderr.decode()), (b.returncode, err_b)):
        assert code == 75, err[-3000:]
        assert "data/prepared (dataset_sha256): the leading node has" in err
        assert err.strip().endswith("it resumes from the last checkpoint")
    assert not (tmp_path / "a" / "models" / "model.pt").exists()
