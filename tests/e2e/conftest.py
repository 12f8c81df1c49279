"""Fixtures of the Prefect tests (``test_prefect_*.py``): a tmp PREFECT_HOME and a server.

Both are module-scoped: one PREFECT_HOME and one temporary Prefect server per test module that
asks for them. ``prefect_env`` is not autouse here, so the other end-to-end modules run without
it; each Prefect module turns it on for all its tests with an autouse fixture of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect_home")))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("DO_NOT_TRACK", "1")
    mp.setenv("DVC_NO_ANALYTICS", "1")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # each project's own store
    yield
    mp.undo()


@pytest.fixture(scope="module")
def prefect_server(prefect_env: None) -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
