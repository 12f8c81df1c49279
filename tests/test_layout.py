"""Small rooms: no function in vae/ or pipelines/ (every subfolder too) runs over 80 lines.

``pytest tests/test_layout.py -s`` prints the five longest.
"""

from __future__ import annotations

import ast

from tests.conftest import REPO

LIMIT = 80


def _function_lengths() -> list[tuple[int, str]]:
    rows = []
    for path in sorted([*REPO.glob("vae/**/*.py"), *REPO.glob("pipelines/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{path.relative_to(REPO)}:{node.name}"
                rows.append((node.end_lineno - node.lineno + 1, name))
    return sorted(rows, reverse=True)


def test_no_function_runs_over_80_lines() -> None:
    rows = _function_lengths()
    for length, name in rows[:5]:
        print(f"{length:4d} {name}")
    assert [r for r in rows if r[0] > LIMIT] == []
