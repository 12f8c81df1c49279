"""The flows' locks: one flow run at a time per DVC workspace, and per model everywhere.

``vae-pipeline`` and ``vae-retrain`` both run DVC stages and experiments in the same checkout;
DVC's own lock makes a second ``dvc repro`` fail at once rather than wait, and two flows
interleaving stages would register models trained on each other's params. The lock is a Prefect
global concurrency limit of one slot (:func:`vae.locks.global_lock`), created when missing.

On a team's workers each flow run has a checkout of its own, so the workspace lock keeps
nothing apart there: the retraining lock does, one flow run per registered model on every
machine and for both deployments (a deployment's own ``concurrency_limit`` only stops a second
run of itself).

Registrations need no lock here: ``vae register`` takes the registry lock itself
(:func:`vae.locks.registry_lock`, the same kind of limit on the same Prefect server), so a
registration started by hand on another machine waits for the flows' as theirs waits for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
from pathlib import Path

from vae.locks import REGISTRY_LEASE_SECONDS, global_lock

__all__ = [
    "LEASE_SECONDS",
    "retrain_lock",
    "retrain_lock_name",
    "workspace_lock",
    "workspace_lock_name",
]

LEASE_SECONDS = 300.0


def workspace_lock_name(root: str | Path) -> str:
    """``vae-workspace-<hash>``: one name per checkout (host and absolute path)."""
    where = f"{socket.gethostname()}:{Path(root).resolve()}"
    return f"vae-workspace-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


def workspace_lock(
    root: str | Path, timeout_seconds: float | None
) -> contextlib.AbstractContextManager[None]:
    """Hold the workspace lock of checkout ``root``; waits up to ``timeout_seconds``."""
    return global_lock(
        workspace_lock_name(root), timeout_seconds, f"a flow run in {root}", LEASE_SECONDS
    )


def retrain_lock_name(registered_model: str) -> str:
    return f"vae-retrain-{registered_model}"


def retrain_lock(
    registered_model: str, timeout_seconds: float | None
) -> contextlib.AbstractContextManager[None]:
    """One flow run that trains ``registered_model`` at a time, on every worker.

    Both flows take it, whichever deployment (on-demand, scheduled) or machine runs them. The
    lease is the shortest Prefect accepts, renewed while the run holds it, so a machine lost
    mid-run frees it within about a minute, before the rerun of its crashed run asks for it.
    """
    what = f"a flow run training {registered_model}"
    return global_lock(
        retrain_lock_name(registered_model), timeout_seconds, what, REGISTRY_LEASE_SECONDS
    )
