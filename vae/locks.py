"""Locks: OS file locks for one machine, Prefect concurrency leases for a team's machines.

``flock`` belongs to the open file, and the kernel closes every file of a process that dies, so
unlike a lock *file* (whose existence is the lock) nothing is left behind by ``kill -9``. Across
machines the lock is a Prefect global concurrency limit of one slot on the shared Prefect server:
its slot is a lease that the holder renews, so a killed holder frees it when the lease runs out.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vae.errors import RetryableError

__all__ = [
    "REGISTRY_LEASE_SECONDS",
    "WRITER_LOCK",
    "LockTimeout",
    "ensure_limit",
    "file_lock",
    "global_lock",
    "prefect_api_url",
    "registry_lock",
    "registry_lock_name",
    "registry_lock_path",
    "workspace_writer",
]

log = logging.getLogger(__name__)

# One writer per workspace: the stages that write models/, metrics/ and the registry take it.
WRITER_LOCK = Path(".vae-writer.lock")


class LockTimeout(RetryableError, RuntimeError):
    """Another process held the lock for longer than we were willing to wait (retryable)."""


@contextmanager
def file_lock(path: str | Path, timeout: float, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path``, waiting up to ``timeout`` seconds for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline, waiting = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = Path(path).read_text().strip() or "another process"
                    waited = f"was not released within {timeout:g} s" if timeout else "is busy"
                    raise LockTimeout(
                        f"{what}: {path} is held by {holder} and {waited}; try again later"
                    ) from None
                if not waiting and timeout:
                    waiting = True
                    holder = Path(path).read_text().strip() or "another process"
                    log.warning(
                        "%s: waiting up to %g s for %s (held by %s)", what, timeout, path, holder
                    )
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def registry_lock_path(uri: str, registered_model: str) -> Path:
    """The lock that makes one registration at a time of ``registered_model`` in store ``uri``.

    For a SQLite store it lies beside the database, so every process that uses that file (queue
    workers, scheduled flows, a user's shell) agrees on it. For a server it is per machine only:
    :func:`registry_lock` takes a Prefect lease instead when a Prefect API is configured.
    """
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return db.with_name(f"{db.name}.register-{registered_model}.lock")
    digest = hashlib.sha256(f"{uri}|{registered_model}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"vae-register-{digest}.lock"


@contextmanager
def workspace_writer(what: str, folder: str | Path = ".") -> Iterator[None]:
    """Refuse at once (:class:`LockTimeout`, exit 75) while another writer works in ``folder``.

    DVC's own lock covers ``dvc repro`` only; this one also covers a ``vae`` command started by
    hand or by a scheduler. An OS lock (``flock``): a killed process cannot leave it held. Under
    torchrun only rank 0 writes, so only rank 0 takes it.
    """
    # the processes `vae train` launches itself: it holds the lock for them (training.launch)
    if int(os.environ.get("RANK", "0")) != 0 or "VAE_TRAIN_LAUNCHED" in os.environ:
        yield
        return
    with file_lock(Path(folder) / WRITER_LOCK, 0.0, what):
        yield


# The shortest lease the Prefect server accepts (60 s): the holder renews it every 45 s, and a
# killed holder's slot is free again 15-60 s later, plus one pass of the server's repossessor.
REGISTRY_LEASE_SECONDS = 60.0
_warned: set[str] = set()


def registry_lock_name(registered_model: str) -> str:
    return f"vae-register-{registered_model}"


def prefect_api_url() -> str | None:
    """The Prefect API this process talks to: ``PREFECT_API_URL``, or the active profile's."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    try:
        from prefect.settings import get_current_settings
    except ImportError:
        return None
    url = get_current_settings().api.url
    return str(url) if url else None


@contextmanager
def registry_lock(uri: str, registered_model: str, timeout: float) -> Iterator[None]:
    """One registration of ``registered_model`` in store ``uri`` at a time, wherever it runs.

    A SQLite store is one machine's: the file lock beside it. A tracking server with a Prefect
    API configured: the global concurrency limit ``vae-register-<model>`` on that Prefect
    server, which every machine of the team shares. A server without one: a file lock on this
    machine, and a one-line warning that other machines are not kept out.
    """
    what = f"registering {registered_model}"
    api = None if uri.startswith("sqlite:///") else prefect_api_url()
    if api is None:
        if not uri.startswith("sqlite:///") and registered_model not in _warned:
            _warned.add(registered_model)
            log.warning(
                "%s: no Prefect API configured (PREFECT_API_URL), so registrations are "
                "serialised on this machine only",
                what,
            )
        with file_lock(registry_lock_path(uri, registered_model), timeout, what):
            yield
        return
    with global_lock(registry_lock_name(registered_model), timeout, what, REGISTRY_LEASE_SECONDS):
        yield


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
            with contextlib.suppress(ObjectAlreadyExists):  # another process created it first
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
                )
            return
        if limit.limit != 1 or not limit.active:
            client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=1, active=True)
            )


@contextmanager
def global_lock(
    name: str, timeout: float | None, what: str, lease_seconds: float = 300.0
) -> Iterator[None]:
    """Hold the one slot of Prefect global concurrency limit ``name`` (created when missing).

    Waits up to ``timeout`` seconds (:class:`LockTimeout`, exit 75); an unreachable Prefect
    server is :class:`LockTimeout` too, in one line. The lease is renewed while the block runs.
    """
    import httpx
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    with contextlib.ExitStack() as stack:
        try:
            ensure_limit(name)
            stack.enter_context(
                concurrency(
                    name, timeout_seconds=timeout, lease_duration=lease_seconds, strict=True
                )
            )
        except TimeoutError:
            raise LockTimeout(
                f"{what}: the Prefect lock {name} was not released within {timeout:g} s; try again"
            ) from None
        except (httpx.HTTPError, OSError, ConcurrencySlotAcquisitionError) as exc:
            # the last: Prefect's wrapper of a failed request, a 500 of a restarting database
            raise LockTimeout(
                f"{what}: the Prefect API {prefect_api_url()} is unreachable ({exc}); try again"
            ) from None
        yield
