"""One registration at a time per registered model: a Prefect global concurrency limit.

Two retraining runs that register at once could both read the same champion, both pass the
gate and both move the ``champion`` alias: the last writer wins, whatever its ``nll_iw``.
``registry_lock(name)`` makes the read-decide-move sequence of ``vae register`` exclusive.

It is a Prefect global concurrency limit of 1 named ``vae-register-<model>``, created here when
missing, rather than a file lock: it holds across checkouts and across the machines of a work
pool, wherever the flows share a Prefect server (the MLflow registry they guard is shared the
same way). The slot is a lease that the holder renews; if the process dies, the lease expires
(``LEASE_SECONDS``) and the next run goes on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["LEASE_SECONDS", "ensure_limit", "lock_name", "registry_lock"]

LEASE_SECONDS = 300.0


def lock_name(registered_model: str) -> str:
    return f"vae-register-{registered_model}"


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
def registry_lock(registered_model: str, timeout_seconds: float | None = 3600) -> Iterator[None]:
    """Hold the registry lock of ``registered_model``; waits up to ``timeout_seconds``."""
    from prefect.concurrency.sync import concurrency

    name = lock_name(registered_model)
    ensure_limit(name)
    with concurrency(
        name, occupy=1, timeout_seconds=timeout_seconds, lease_duration=LEASE_SECONDS, strict=True
    ):
        yield
