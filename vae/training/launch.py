"""``vae train`` past one process: the command launches torchrun itself, from the params.

With ``train.nnodes`` or ``train.nproc_per_node`` above 1, ``vae train`` (the DVC stage's command)
runs ``python -m torch.distributed.run ... -m vae train`` with a c10d rendezvous at
``train.rdzv_endpoint`` and waits for it; each other node runs ``vae train --join`` in its own
clone. The processes of the node that ran ``vae train`` carry ``VAE_TRAIN_LAUNCHED=writer``, the
others ``join``, so the writer is always in the clone DVC runs in, whichever global rank c10d
deals it (:mod:`vae.training.distributed`). ``--max-restarts 0``: a lost node fails the run on
every node, in one line; rerunning ``vae train`` on each resumes from the writer's checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from vae.config import Config, ConfigError
from vae.errors import RetryableError
from vae.training.distributed import LAUNCHED_ENV, agree

__all__ = [
    "NodeFailed",
    "launch",
    "needs_launch",
    "params_digest",
    "same_on_every_node",
    "torchrun_command",
    "train_argv",
]

log = logging.getLogger(__name__)


class NodeFailed(RetryableError, RuntimeError):
    """A training process on some node failed or was lost: worth a rerun, which resumes."""


def needs_launch(cfg: Config, join: bool) -> bool:
    """True when this ``vae train`` is to launch torchrun (and is not one of its processes)."""
    tc = cfg.train
    if join and tc.nnodes == 1:
        raise ConfigError("train.nnodes: 1, so there is no run to --join; set it to the nodes")
    return tc.nnodes * tc.nproc_per_node > 1 and "TORCHELASTIC_RUN_ID" not in os.environ


def _loopback(endpoint: str) -> bool:
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def torchrun_command(cfg: Config, vae_args: Sequence[str]) -> list[str]:
    """The torchrun command line for this node, running ``vae`` with ``vae_args``."""
    tc = cfg.train
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tc.nproc_per_node}"]
    if tc.nnodes == 1:
        cmd += ["--standalone"]  # a free local port: no endpoint to agree on
    else:
        cmd += [f"--nnodes={tc.nnodes}", "--rdzv-backend=c10d", "--max-restarts=0"]
        cmd += [f"--rdzv-endpoint={tc.rdzv_endpoint}", f"--rdzv-id=vae-train-{_run_id(cfg)}"]
        if _loopback(tc.rdzv_endpoint) and "PET_LOCAL_ADDR" not in os.environ:
            cmd += ["--local-addr=127.0.0.1"]  # one machine: advertise loopback, not its name
    return [*cmd, "-m", "vae", *vae_args]


def params_digest(cfg: Config) -> str:
    """A short hash of every param: the nodes of one run must have the same."""
    body = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def same_on_every_node(cfg: Config, dataset_sha256: str) -> None:
    """Under torchrun: a ConfigError on every rank unless all have the writer's data, params and
    training code (a node on another commit would train another model)."""
    from vae.training.checkpoint import code_fingerprint

    agree("data/prepared (dataset_sha256)", dataset_sha256)
    agree("params.yaml (a hash of every param)", params_digest(cfg))
    agree("the training code (its fingerprint)", code_fingerprint()[:12])


def _run_id(cfg: Config) -> str:
    """The same on every node of one run: the registered model's name."""
    return cfg.mlflow.registered_model


def train_argv(args: argparse.Namespace) -> list[str]:
    """The ``vae`` arguments of this ``vae train`` (``--join`` left out)."""
    argv = ["--params", args.params, *(["-q"] if args.quiet else []), "train"]
    for flag in ("data", "models", "metrics", "plots"):
        argv += [f"--{flag}", getattr(args, flag)]
    return argv + (["--no-resume"] if args.no_resume else [])


def launch(cfg: Config, args: argparse.Namespace) -> None:
    """Run this node's part of the training under torchrun; NodeFailed if any part failed."""
    tc, join = cfg.train, args.join
    env = {**os.environ, LAUNCHED_ENV: "join" if join else "writer"}
    if _loopback(tc.rdzv_endpoint) and tc.nnodes > 1:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's own sockets on loopback too
    cmd = torchrun_command(cfg, train_argv(args))
    role = "joining" if join else "leading"
    log.info(
        "%s a %d-node x %d-process training at %s",
        role,
        tc.nnodes,
        tc.nproc_per_node,
        tc.rdzv_endpoint if tc.nnodes > 1 else "this machine",
    )
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        code = _wait(proc)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 0:
        raise NodeFailed(
            f"torchrun exited with {code}: a training process or a node failed or was lost "
            "(its error is above); run the same command on every node again: it resumes from "
            "the last checkpoint"
        )


def _wait(proc: subprocess.Popen) -> int:
    """The exit code; Ctrl-C is passed on to torchrun, which stops its processes."""
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
