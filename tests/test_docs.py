"""The README and the docs name only what exists: every path under vae/, tests/, pipelines/,
benchmarks/ and docs/, every ``tests/...::test_name``, and every dotted ``vae.…`` name."""

from __future__ import annotations

import ast
import importlib
import re

from tests.conftest import REPO

DOCS = sorted([REPO / "README.md", REPO / "benchmarks" / "README.md", *REPO.glob("docs/*.md")])
PATH = re.compile(r"(?<![\w/.-])((?:vae|tests|pipelines|benchmarks|docs)/[\w/.-]*\w)(::\w+)?")
DOTTED = re.compile(r"(?<![\w./-])(vae(?:\.\w+)+)")
LATER = ("::", "tests/fixtures")  # test names are checked by their file's function list


def _functions(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_every_path_the_docs_name_exists() -> None:
    missing = []
    for doc in DOCS:
        for m in PATH.finditer(doc.read_text()):
            path, test = m.group(1).rstrip("."), m.group(2)
            if "*" in path or not (REPO / path).exists():
                if "*" not in path:
                    missing.append(f"{doc.name}: {path}")
                continue
            if test and test[2:] not in _functions(path):
                missing.append(f"{doc.name}: {path}{test}")
    assert missing == []


def test_every_dotted_vae_name_the_docs_use_resolves() -> None:
    missing = []
    for doc in DOCS:
        for name in set(DOTTED.findall(doc.read_text())):
            parts = name.split(".")
            for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                for attr in parts[i:]:
                    obj = getattr(obj, attr, None)
                if obj is None:
                    missing.append(f"{doc.name}: {name}")
                break
    assert sorted(missing) == []
