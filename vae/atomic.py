"""Atomic file writes (a module name that shadows nothing: a model ships this package's code
first on sys.path): a reader (a later stage, DVC, a user) never sees a half-written file.

Every output is written to a temporary file in the same folder, flushed and fsync'ed, then
moved over the target with ``os.replace``, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_with",
    "load_json",
]


@contextlib.contextmanager
def _replacing(path: str | Path, suffix: str) -> Iterator[tuple[int, Path]]:
    """A temporary sibling of ``path`` (fd, name); on success it replaces ``path`` durably.

    The body must fsync its data; on any failure the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        yield fd, Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success move it over ``path``."""
    with _replacing(path, ".tmp") as (fd, _), os.fdopen(fd, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rows of equal keys as a CSV file with a header (the first row's keys, in order)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_with(path: str | Path, write: Callable[[Path], None]) -> None:
    """For writers that insist on a path (pandas, PIL): ``write(tmp_path)`` then replace."""
    with _replacing(path, Path(path).suffix) as (fd, tmp):
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)
