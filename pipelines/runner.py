"""Serve deployments from this process, and stop within seconds of SIGTERM.

``prefect.serve`` alone has two problems when no Prefect server is configured
(``PREFECT_API_URL`` unset), which is how ``python -m pipelines.serve`` runs out of the box:

- Prefect starts a temporary server as a plain child in this process group, and it runs no
  scheduler, so a cron schedule never fires.
- On SIGTERM (``kill``, systemd, a supervisor; sent to the whole group, the server dies at once)
  the runner's graceful shutdown needs that server: it cancels the running flow runs, runs their
  hooks and pauses the schedules through the API, and each call retries with backoff for about
  a minute. The process hangs, and the flow run stays Running.

So :func:`serve_with_deadline` starts ``prefect server start`` itself, in a session of its own
(out of reach of a group SIGTERM, and with the scheduler), and exports its URL so that flow-run
processes use it too. SIGTERM still goes to Prefect's own ``Runner.handle_sigterm`` (the flow
runs end Cancelled), plus a watchdog: if the process is still alive after ``GRACE_S`` (Prefect
gives a flow-run process 30 s, which no setting changes), it kills the flow-run processes, marks
their runs Crashed, and exits. Pointing ``PREFECT_API_URL`` at a real server skips the server
start; the rest is the same.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

__all__ = ["GRACE_S", "serve_with_deadline", "start_local_server", "stop_server"]

GRACE_S = 6.0  # Prefect's own shutdown gets this long; the process is gone within ~7 s
SWEEP_S = 2.0  # at most this long for marking leftover runs Crashed
SERVER_CMD = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--no-ui"]


def _log(msg: str) -> None:
    print(f"pipelines.serve: {msg}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """Linux: SIGTERM the server if this process dies without cleaning up (``kill -9``)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start_local_server(timeout: float = 120) -> tuple[subprocess.Popen[bytes], str]:
    """``prefect server start`` on a free 127.0.0.1 port, in its own session; its API URL."""
    import httpx

    with socket.socket() as sock:  # free now; the server binds it a moment later
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [*SERVER_CMD, "--port", str(port)],
        start_new_session=True,  # a SIGTERM to our process group must not reach it
        # preexec_fn is only safe while this process has one thread, as it has here
        preexec_fn=_die_with_parent if threading.active_count() == 1 else None,
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server start exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"the local Prefect server did not answer within {timeout} s")


def stop_server(proc: subprocess.Popen[bytes] | None, timeout: float = 1.0) -> None:
    """SIGTERM the server's group, SIGKILL after ``timeout``: its data is already committed."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        try:  # uvicorn waits for open websockets; don't wait for it long
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _bounded(fn: Callable[[], None], timeout: float) -> None:
    """Run ``fn`` in a daemon thread for at most ``timeout`` s: an API call must not hang us."""
    ctx = contextvars.copy_context()  # keeps temporary_settings (the API URL) in the thread
    thread = threading.Thread(target=ctx.run, args=(fn,), daemon=True)
    thread.start()
    thread.join(timeout)


def crash_unfinished_runs(deployment_ids: list[UUID], message: str, pause: bool = False) -> None:
    """Mark the runs of these deployments that never reached a final state Crashed.

    Assumes this process is the only one serving them (one ``pipelines.serve`` per workspace).
    ``pause``: also pause the deployments, as the runner does on a clean stop, so that no runs
    pile up for a process that is gone.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    unfinished = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]

    def sweep() -> None:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=deployment_ids)),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=unfinished))
                ),
            )
            for run in runs:
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                _log(f"marked flow run {run.name!r} Crashed")
            for deployment_id in deployment_ids if pause else []:
                client.pause_deployment(deployment_id)

    _bounded(sweep, SWEEP_S)


def _runner_class() -> type:
    from prefect.runner import Runner

    class DeadlineRunner(Runner):
        """Prefect's Runner, whose SIGTERM handling also starts a hard deadline."""

        server: subprocess.Popen[bytes] | None = None
        deployment_ids: list[UUID]
        _watchdog: threading.Thread | None = None

        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._deadline, daemon=True)
                self._watchdog.start()
            super().handle_sigterm(*args, **kwargs)  # cancel in-flight runs, then stop

        def _deadline(self) -> None:
            import psutil

            time.sleep(GRACE_S)
            try:
                _log(f"still stopping after {GRACE_S:g} s: killing the flow-run processes")
                server_sid = self.server.pid if self.server is not None else None
                for child in psutil.Process().children(recursive=True):  # all but the server
                    with contextlib.suppress(psutil.Error, OSError):
                        if os.getsid(child.pid) != server_sid:
                            child.kill()
                message = f"the serving process killed its flow runs after {GRACE_S:g} s"
                crash_unfinished_runs(self.deployment_ids, message, pause=True)
                stop_server(self.server, timeout=0.2)
            finally:
                os._exit(1)  # not sys.exit: atexit hooks and thread joins may be what hangs

    return DeadlineRunner


def serve_with_deadline(*deployments: RunnerDeployment, limit: int | None = None) -> None:
    """``prefect.serve(*deployments, limit=limit)`` that exits within ~7 s of SIGTERM."""
    from prefect.exceptions import TerminationSignal
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    server = None
    # Until Runner.start() installs its handler, SIGTERM just exits (atexit stops the server).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.ExitStack() as stack:
        if get_current_settings().api.url is None:
            server, url = start_local_server()
            # atexit, not `finally`: it runs after Prefect's log and event workers have drained,
            # so they still have an API to flush to.
            atexit.register(stop_server, server)
            os.environ["PREFECT_API_URL"] = url  # flow-run processes inherit it
            stack.enter_context(temporary_settings({PREFECT_API_URL: url}))  # and this one
            _log(f"local Prefect server (pid {server.pid}) at {url}")
        runner = _runner_class()(pause_on_shutdown=True, limit=limit)
        runner.server = server
        runner.deployment_ids = [runner.add_deployment(d) for d in deployments]
        _log("serving " + ", ".join(f"{d.flow_name}/{d.name}" for d in deployments))
        try:
            asyncio.run(runner.start())
        except (KeyboardInterrupt, TerminationSignal) as exc:
            _log(f"{type(exc).__name__}: shutting down")
        crash_unfinished_runs(runner.deployment_ids, "the serving process stopped")
        _log("stopped")
