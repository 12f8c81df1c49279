"""The work units of ``make test``'s two workers: a module, or every team test together."""

from __future__ import annotations

import pytest

from tests.xdist_groups import scope


@pytest.mark.parametrize(
    ("nodeid", "unit"),
    [
        ("tests/team/test_workers.py::test_two", "tests/team"),
        ("tests/team/test_store.py::test_a[x-y]", "tests/team"),
        ("tests/e2e/test_prefect_retrain.py::test_first", "tests/e2e/test_prefect_retrain.py"),
        ("tests/e2e/test_prefect_retrain.py::test_second", "tests/e2e/test_prefect_retrain.py"),
        ("tests/test_config.py::test_bad[a::b]", "tests/test_config.py"),
        ("tests/teamwork/test_x.py::test_y", "tests/teamwork/test_x.py"),
    ],
)
def test_a_module_or_the_team_folder_is_one_unit(nodeid: str, unit: str) -> None:
    assert scope(nodeid) == unit
