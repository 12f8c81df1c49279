"""Prefect global concurrency limits of one slot: what must not run twice at once.

- ``workspace_lock(root)``: one flow run at a time per DVC workspace. ``vae-pipeline`` and
  ``vae-retrain`` both run DVC stages and experiments in the same checkout; DVC's own lock
  makes a second ``dvc repro`` fail at once rather than wait, and two flows interleaving stages
  would register models trained on each other's params.
- ``registry_lock(model)``: one registration at a time per registered model, across checkouts
  and the machines of a work pool that share a Prefect server. ``vae register`` also takes a
  file lock of its own (:mod:`vae.locks`), which covers the processes of one machine (queue
  workers, a shell) that know nothing of Prefect.

A limit is created here when missing. Its slot is a lease that the holder renews; if the process
dies, the lease expires (``LEASE_SECONDS``) and the next run goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "LEASE_SECONDS",
    "ensure_limit",
    "lock_name",
    "registry_lock",
    "workspace_lock",
    "workspace_lock_name",
]

LEASE_SECONDS = 300.0


def lock_name(registered_model: str) -> str:
    return f"vae-register-{registered_model}"


def workspace_lock_name(root: str | Path) -> str:
    """``vae-workspace-<hash>``: one name per checkout (host and absolute path)."""
    where = f"{socket.gethostname()}:{Path(root).resolve()}"
    return f"vae-workspace-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


def ensure_limit(name: str) -> None:
    """Create the global concurrency limit ``name`` with one slot, or reset it to one slot."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
                )
            return
        if limit.limit != 1 or not limit.active:
            client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=1, active=True)
            )


@contextmanager
def _one_slot(name: str, timeout_seconds: float | None) -> Iterator[None]:
    from prefect.concurrency.sync import concurrency

    ensure_limit(name)
    with concurrency(
        name, occupy=1, timeout_seconds=timeout_seconds, lease_duration=LEASE_SECONDS, strict=True
    ):
        yield


def registry_lock(
    registered_model: str, timeout_seconds: float | None = 3600
) -> contextlib.AbstractContextManager[None]:
    """Hold the registry lock of ``registered_model``; waits up to ``timeout_seconds``."""
    return _one_slot(lock_name(registered_model), timeout_seconds)


def workspace_lock(
    root: str | Path, timeout_seconds: float | None
) -> contextlib.AbstractContextManager[None]:
    """Hold the workspace lock of checkout ``root``; waits up to ``timeout_seconds``."""
    return _one_slot(workspace_lock_name(root), timeout_seconds)
