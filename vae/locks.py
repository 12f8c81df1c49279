"""OS file locks: what a killed process held is free again at once.

``flock`` belongs to the open file, and the kernel closes every file of a process that dies, so
unlike a lock *file* (whose existence is the lock) nothing is left behind by ``kill -9``.
"""

from __future__ import annotations

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

__all__ = ["WRITER_LOCK", "LockTimeout", "file_lock", "registry_lock_path", "workspace_writer"]

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
    workers, scheduled flows, a user's shell) agrees on it. For a server it is per machine; the
    Prefect flows add a global concurrency limit that holds across machines.
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
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with file_lock(Path(folder) / WRITER_LOCK, 0.0, what):
        yield
