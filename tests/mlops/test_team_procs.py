"""The team stack's start checks, without starting a server: a taken port, a service that dies."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from vae.errors import exit_code
from vae.mlops.team.procs import ServiceError, running, start, wait_until
from vae.mlops.team.services import start_service
from vae.mlops.team.state import HOST, load_or_create


def test_a_taken_port_is_named_and_nothing_starts(tmp_path: Path) -> None:
    stack = load_or_create(tmp_path / "state")
    with socket.socket() as other:  # another program on the port chosen for MLflow
        other.bind((HOST, stack.ports["mlflow"]))
        other.listen()
        with pytest.raises(ServiceError) as info:
            start_service(stack, "mlflow")
    port = stack.ports["mlflow"]
    assert str(info.value).startswith(f"the MLflow server: port {port} on 127.0.0.1 is taken")
    assert running(stack.state, "mlflow") is None
    assert not stack.path("logs", "mlflow.log").exists()


def test_a_port_in_time_wait_is_not_taken(tmp_path: Path) -> None:
    stack = load_or_create(tmp_path / "state")
    port = stack.ports["prefect"]
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((HOST, port))
        server.listen()
        client = socket.create_connection((HOST, port))
        conn, _ = server.accept()
        conn.close()  # the server's side closes first: its port waits in TIME_WAIT
        client.close()
    from vae.mlops.team.procs import ensure_ports_free

    ensure_ports_free("the Prefect server", HOST, [port])


def test_a_service_that_exits_is_named_with_its_error_line(tmp_path: Path) -> None:
    code = "print('starting'); print('FATAL: no database x'); print(); print('(see the docs)')"
    start(tmp_path, "thing", [sys.executable, "-c", code + "; exit(3)"], {}, tmp_path / "thing")
    with pytest.raises(ServiceError) as info:
        wait_until(lambda: False, "the thing", 30, tmp_path, "thing")
    message = str(info.value)
    assert message.startswith("the thing exited; in ")
    assert message.endswith(": FATAL: no database x")
    assert exit_code(info.value) == 75


def test_a_service_that_hangs_is_named_after_the_timeout(tmp_path: Path) -> None:
    start(tmp_path, "slow", [sys.executable, "-c", "import time; time.sleep(60)"], {}, tmp_path)
    try:
        with pytest.raises(ServiceError, match=r"^the slow one not healthy within 1 s; "):
            wait_until(lambda: False, "the slow one", 1, tmp_path, "slow")
    finally:
        from vae.mlops.team.procs import stop

        assert stop(tmp_path, "slow", grace=5)
