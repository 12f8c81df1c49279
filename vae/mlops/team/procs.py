"""Background servers of the stack: started in their own session, logged, recorded by pid file,
waited for until healthy, stopped by process group."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from vae.errors import RetryableError

__all__ = [
    "ServiceError",
    "ensure_ports_free",
    "http_ok",
    "running",
    "start",
    "stop",
    "wait_until",
]


class ServiceError(RetryableError, RuntimeError):
    """A service of the stack did not come up, or answers wrongly; the line says which."""


def _pid_file(state: Path, name: str) -> Path:
    return state / "run" / f"{name}.pid"


def running(state: Path, name: str) -> int | None:
    """The pid of service ``name`` if its recorded process is alive."""
    try:
        pid = int(_pid_file(state, name).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def ensure_ports_free(what: str, host: str, ports: list[int]) -> None:
    """Fail naming ``what`` and the port if another program listens on one of ``ports``.

    Checked before a start: otherwise a health check could pass against that other program.
    """
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
            try:
                probe.bind((host, port))
            except OSError:
                raise ServiceError(
                    f"{what}: port {port} on {host} is taken by another program "
                    f"(ss -ltnp 'sport = :{port}' names it); stop it, or use a new state folder"
                ) from None


def start(state: Path, name: str, args: list[str], env: dict[str, str], cwd: Path) -> int:
    """Start ``args`` in a new session, output to ``logs/<name>.log``; returns its pid."""
    (state / "run").mkdir(parents=True, exist_ok=True)
    (state / "logs").mkdir(exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    with open(state / "logs" / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _pid_file(state, name).write_text(str(proc.pid))
    return proc.pid


def stop(state: Path, name: str, grace: float = 15.0) -> bool:
    """SIGTERM the process group of ``name``, then SIGKILL after ``grace`` s; True if it ran."""
    pid = running(state, name)
    _pid_file(state, name).unlink(missing_ok=True)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return True


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return stat != "Z"


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status < 400
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until(
    check: Callable[[], bool], what: str, timeout: float, state: Path, name: str
) -> None:
    """Poll ``check`` until true; fail naming ``what`` and the log's error line otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if name and running(state, name) is None:
            break
        time.sleep(0.3)
    log = state / "logs" / f"{name}.log"
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    exited = name and running(state, name) is None
    raise ServiceError(
        f"{what} {'exited' if exited else f'not healthy within {timeout:g} s'}; "
        f"in {log}: {_reason(lines)[:300]}"
    )


_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception)\b|FATAL|ERROR|[Ee]rror:")


def _reason(lines: list[str]) -> str:
    """The last line of a log that reads as an error (a traceback's last, a FATAL), else the
    last line: a traceback ends in notes such as SQLAlchemy's "Background on this error"."""
    for line in reversed(lines[-200:]):
        if _ERROR_LINE.search(line):
            return line.strip()
    return lines[-1].strip() if lines else "no output"
