"""``python -m pipelines.serve`` exits within 10 s of SIGTERM, leaving no flow run Running.

It runs as users run it: no PREFECT_API_URL, so it brings its own Prefect server. A flow run of
``vae-pipeline/on-demand`` is started on a project whose one stage hangs; then the serving process
gets SIGTERM, on its PID (``kill PID``) or its whole process group (systemd, ``kill -- -PGID``).
Its server goes with it, so the run's final state is read back from a server the test starts on
the same PREFECT_HOME (the SQLite database outlives both).

Every process started here carries VAE_TEST_MARK=<uuid> in its environment (children inherit
it), and teardown kills every process with that mark, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.conftest import REPO, TINY_PARAMS, dvc, process_alive, run, subprocess_env

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these

MARK = "VAE_TEST_MARK"
EXIT_WITHIN_S = 10.0


class Procs:
    """Starts processes in sessions of their own; kills them and everything they started."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.mark, self.started = tmp, uuid.uuid4().hex, []

    def env(self, home: Path) -> dict[str, str]:
        env = {k: v for k, v in subprocess_env().items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PYTHONPATH=str(REPO),
            **{MARK: self.mark},
        )
        return env

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> Any:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append(proc)
        return proc, log

    def marked(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(MARK) == self.mark:
                    found.append(proc)
        return found

    def cleanup(self) -> None:
        for proc in self.started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for proc in self.marked():  # e.g. a server in a session of its own
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    procs = Procs(tmp_path)
    yield procs
    procs.cleanup()


def _wait_for(what: str, pred: Callable[[], Any], timeout: float, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-4000:] if log else ""
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tail}")


def _start_server(procs: Procs, home: Path) -> str:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    proc, log = procs.start("check-server", [*cmd, "--port", str(port)], procs.env(home), home)
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        return False

    _wait_for(f"a Prefect server on {url}", healthy, 120, log)
    return url


@pytest.mark.parametrize("target", ["pid", "group"])
def test_sigterm_stops_serving_within_10s_and_ends_the_run(
    target: str, procs: Procs, tmp_path: Path
) -> None:
    from prefect.client.orchestration import SyncPrefectClient

    root = tmp_path / "proj"
    root.mkdir()
    stage = {"cmd": "sh -c 'echo $$ > stage.pid; sleep 300'"}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"stuck": stage}}))
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    run(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    home = tmp_path / "prefect_home"
    cmd = [sys.executable, "-m", "pipelines.serve", "--root", str(root)]
    serving, log = procs.start("serve", cmd, procs.env(home), REPO)
    _wait_for("serving", lambda: "serving vae-pipeline/on-demand" in log.read_text(), 180, log)
    url = re.search(r"at (http://127\.0\.0\.1:\d+/api)", log.read_text()).group(1)  # type: ignore[union-attr]
    with SyncPrefectClient(url) as client:
        deployment = client.read_deployment_by_name("vae-pipeline/on-demand")
        flow_run = client.create_flow_run_from_deployment(deployment.id)
    _wait_for("the stage to start", lambda: (root / "stage.pid").exists(), 120, log)
    stage_pid = int((root / "stage.pid").read_text())

    start = time.monotonic()
    if target == "pid":
        serving.send_signal(signal.SIGTERM)
    else:
        os.killpg(serving.pid, signal.SIGTERM)
    try:
        serving.wait(EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {EXIT_WITHIN_S} s after SIGTERM\n{log.read_text()[-4000:]}")
    took = time.monotonic() - start
    _wait_for("every process it started to exit", lambda: not procs.marked(), 5, log)
    assert not process_alive(stage_pid), "the stage outlived the serving process"

    url = _start_server(procs, home)  # the same database, read through a new server
    with SyncPrefectClient(url) as client:
        state = _wait_for(
            "a final state",
            lambda: (s := client.read_flow_run(flow_run.id).state).is_final() and s,
            10,
        )
    assert state.type.value in {"CANCELLED", "CRASHED"}, (state, took)
    print(f"[{target}] exited {took:.1f} s after SIGTERM; the flow run ended {state.type.value}")
