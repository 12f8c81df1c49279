"""Which tests share a worker under ``pytest -n N``.

A module's tests stay together on one worker, in order, so its module-scoped servers, venvs and
pipelines are built once; every ``team`` test shares one worker, so the run starts one team
stack (session-scoped). A scheduler rather than ``xdist_group`` marks: pytest-xdist 3.8's
``--dist loadgroup`` renames node ids, which pytest 9 no longer reads.
"""

from __future__ import annotations

from typing import Any

import pytest


def scope(nodeid: str) -> str:
    """The work unit of a test: ``tests/team``, or its module's path."""
    path = nodeid.split("::", 1)[0]
    return "tests/team" if path.startswith("tests/team/") else path


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, there only when it is
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope(nodeid)

    return ByModule(config, log)
