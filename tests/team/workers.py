"""Helpers of the worker tests: machines (a folder, a virtual environment, a worker), the
Prefect REST API of the team's server, and a local receiver of notifications."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Machine:
    """A worker's machine: its own folder, virtual environment, temporary folder and worker."""

    folder: Path
    name: str
    proc: subprocess.Popen | None = None

    @property
    def python(self) -> Path:
        return self.folder / "venv" / "bin" / "python"

    @property
    def tmp(self) -> Path:
        return self.folder / "tmp"

    def rss_mib(self) -> float:
        """The worker and every process it started, in MiB."""
        try:
            top = psutil.Process(self.proc.pid)
            procs = [top, *top.children(recursive=True)]
        except psutil.Error:
            return 0.0
        return sum(_rss(p) for p in procs) / 2**20

    def lose(self) -> list[int]:
        """The machine is lost: SIGKILL the worker and every process it started (the flow-run
        process and the stages run in sessions of their own); their pids."""
        top = psutil.Process(self.proc.pid)
        procs = [top, *top.children(recursive=True)]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        return [p.pid for p in procs]


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def make_machine(folder: Path, name: str, project: Path) -> Machine:
    """A virtual environment of its own over this one's packages (the pinned stack a machine
    installs once), with the project installed into it the way a machine is set up."""
    folder.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(folder / "venv")], check=True
    )
    machine = Machine(folder, name)
    site = subprocess.run(
        [str(machine.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "_pinned_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    machine.tmp.mkdir()
    pip = [str(machine.python), "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*pip, "--no-build-isolation", "-e", str(project)], check=True)
    return machine


def start_worker(machine: Machine, env: dict[str, str]) -> None:
    env = {**env, "TMPDIR": str(machine.tmp), "PREFECT_HOME": str(machine.folder / "prefect")}
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"  # pick up a run within seconds, not 10
    log = open(machine.folder / "worker.log", "w")  # noqa: SIM115 - the worker's, for its life
    machine.proc = subprocess.Popen(
        [str(machine.python), "-m", "pipelines.worker", "start", "--name", machine.name],
        cwd=machine.folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_worker(machine: Machine) -> None:
    if machine.proc is not None and machine.proc.poll() is None:
        machine.lose()


@dataclass
class Api:
    """The Prefect server's REST API (no client settings of this process involved)."""

    url: str

    def post(self, path: str, body: dict[str, Any]) -> Any:
        resp = httpx.post(f"{self.url}{path}", json=body, timeout=30)
        resp.raise_for_status()
        return resp.json()

    def get(self, path: str) -> Any:
        resp = httpx.get(f"{self.url}{path}", timeout=30)
        resp.raise_for_status()
        return resp.json()

    def run(self, deployment: str, **parameters: Any) -> dict[str, Any]:
        dep = self.get(f"/deployments/name/{deployment}")
        return self.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.get(f"/flow_runs/{run_id}")

    def runs_of(self, deployment: str) -> list[dict[str, Any]]:
        dep = self.get(f"/deployments/name/{deployment}")
        body = {"deployments": {"id": {"any_": [dep["id"]]}}, "sort": "START_TIME_ASC"}
        return self.post("/flow_runs/filter", body)

    def logs(self, run_id: str) -> list[str]:
        body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
        out, offset = [], 0
        while True:
            page = self.post("/logs/filter", {**body, "offset": offset})
            out += [f"{log['timestamp']} {log['message']}" for log in page]
            if len(page) < 200:
                return out
            offset += 200

    def wait(self, run_ids: list[str], timeout: float, states: set[str] = FINAL) -> dict:
        deadline, runs = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            runs = {i: self.flow_run(i) for i in run_ids}
            if all(r["state_type"] in states for r in runs.values()):
                return runs
            time.sleep(2)
        raise AssertionError(f"not {states} within {timeout} s: {_states(runs)}")


def _states(runs: dict[str, dict]) -> dict[str, str]:
    return {r["name"]: r["state_name"] for r in runs.values()}


def code_line(api: Api, run_id: str) -> str:
    """The flow's "vae X from PATH; ROOT at commit SHA" line."""
    lines = [line for line in api.logs(run_id) if " from " in line and " at commit " in line]
    assert lines, api.logs(run_id)[-20:]
    return lines[0]


def which_machine(api: Api, run_id: str, machines: list[Machine]) -> Machine:
    line = code_line(api, run_id)
    found = [m for m in machines if f" from {m.tmp.resolve()}/" in line]
    assert len(found) == 1, (line, [str(m.tmp) for m in machines])
    return found[0]


@dataclass
class Receiver:
    """An HTTP listener on 127.0.0.1 keeping every JSON body posted to it."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/prefect"

    def start(self) -> Receiver:
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                bodies.append(json.loads(self.rfile.read(length) or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
