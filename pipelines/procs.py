"""Run a command under a deadline, streaming its output, and kill its whole process group.

A stage is ``dvc repro`` -> shell -> ``vae`` (and DVC's own helpers): killing only the direct
child leaves the rest running and holding the output pipe open, so a reader blocked on that pipe
never returns. Each command therefore starts in a new session (its own process group); its
output is read on a thread, the caller waits on the process with a deadline, and at the deadline
the whole group gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vae.errors import PermanentError

__all__ = ["CommandResult", "CommandTimeout", "run_command"]

# Between SIGTERM and SIGKILL: short, so that a flow run stopped by `pipelines.serve` (which
# allows its flow runs GRACE_S) has killed its stage first. A killed `train` resumes anyway.
GRACE_SECONDS = 3.0


class CommandTimeout(PermanentError, RuntimeError):
    """The command ran past its deadline; its process group was killed."""


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    tail: list[str]  # the last lines of output


def _kill_group(proc: subprocess.Popen[str]) -> None:
    for sig, wait in ((signal.SIGTERM, GRACE_SECONDS), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            # the leader is gone; make sure nothing else of the group survives it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(
    cmd: Sequence[str],
    cwd: str | Path,
    env: dict[str, str],
    timeout: float,
    on_line: Callable[[str], None] = lambda line: None,
    log_file: Path | None = None,
    tail_lines: int = 40,
) -> CommandResult:
    """Run ``cmd``; each output line goes to ``on_line`` and ``log_file``.

    Raises :class:`CommandTimeout` after ``timeout`` seconds, once the process group is dead.
    A caller interrupted meanwhile (Ctrl-C, a SIGTERM turned into an exception) kills the group
    too, so no stage outlives the flow run that started it.
    """
    tail: deque[str] = deque(maxlen=tail_lines)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    sink = open(log_file, "a", buffering=1) if log_file else None  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if sink:
                sink.write(line + "\n")
            if line:
                tail.append(line)
                on_line(line)

    reader = threading.Thread(target=pump, name="command-output", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            reader.join(timeout=5)
            raise CommandTimeout(
                f"{' '.join(cmd)}: still running after {timeout:g} s; killed its process group"
            ) from None
        reader.join(timeout=30)  # output still buffered after the exit
    except BaseException:
        if proc.poll() is None:
            _kill_group(proc)
        raise
    finally:
        if sink:
            sink.close()
    return CommandResult(proc.returncode, list(tail))
