"""The house: which room of vae/ may import which, small modules and small functions.

Rooms are the subpackages of vae/ (core, data, training, evaluation, mlops, serving) and the
top-level modules. The import graph comes from :mod:`vae.imports` (the source, read with ast),
function-local imports included. Each rule is also run on a small tree that breaks it, so a
rule that could never fail would fail here. ``pytest tests/test_layout.py -s`` prints the five
longest functions and modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from vae.imports import closure, module_file, module_name, runtime_nodes, vae_imports

FUNCTION_LIMIT, MODULE_LIMIT = 80, 350
CHECKED = ("vae", "pipelines", "benchmarks", "tests")
SKIPPED = ("tests/fixtures",)  # data: a registered model's code from before the move

# room -> the rooms it may import (its own and the package root always; deferred ones too).
BASE = {"config", "errors"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "imports": set(),
    "config": {"errors"},
    "atomic": {"errors"},
    "locks": {"errors"},
    "environment": {"errors"},
    "outputs": set(),
    "params": BASE,
    "presets": BASE | {"params"},
    "core": BASE,
    "pyfunc": BASE | {"core"},
    "data": BASE | {"atomic"},
    "training": BASE | {"atomic", "imports", "core", "data"},
    "evaluation": BASE | {"atomic", "core", "data"},
    "mlops": BASE
    | {"atomic", "locks", "imports", "outputs", "pyfunc", "core", "data"}
    | {"evaluation"},
    "serving": BASE | {"atomic", "locks", "pyfunc", "core", "data", "mlops"},
    "stages": BASE
    | {"atomic", "locks", "outputs", "core", "data", "training", "evaluation"}
    | {"mlops"},
    "cli": BASE | {"locks", "outputs", "params", "presets", "stages", "serving", "training"},
    "__main__": {"cli"},
    "__init__": set(),
}
# What the core install (`pip install vae`) has, for what serving imports when it is imported.
CORE_INSTALL = {"torch", "mlflow", "safetensors", "numpy", "PIL", "pandas", "pyarrow", "yaml"}
CORE_INSTALL |= {"tqdm", "cronsim"}


def _room(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _files(root: Path, folder: str) -> list[Path]:
    return sorted(
        p
        for p in (root / folder).glob("**/*.py")
        if not str(p.relative_to(root)).startswith(SKIPPED)
    )


def wrong_arrows(root: Path) -> list[str]:
    """Every import in ``root/vae`` against :data:`ALLOWED`, naming both modules."""
    package = root / "vae"
    wrong = []
    for path in _files(root, "vae"):
        src = module_name(path, package)
        for imp in vae_imports(path, package):
            a, b = _room(src), _room(imp.module)
            if b not in {a, "__init__"} and b not in ALLOWED.get(a, set()):
                how = "inside a function" if imp.deferred else "at import time"
                wrong.append(f"{src} imports {imp.module} ({how}, line {imp.line})")
    return wrong


def reaches(root: Path, sources: list[str], rooms: set[str], deferred: bool) -> list[str]:
    """Modules of ``rooms`` that ``sources`` reach, transitively."""
    found = closure(sources, deferred=deferred, root=root / "vae")
    return sorted(m for m in found if _room(m) in rooms)


def _third_party(path: Path, deferred: bool) -> set[str]:
    """Top-level names of the non-vae, non-stdlib imports of ``path`` (at import time only,
    unless ``deferred``)."""
    tree = ast.parse(path.read_text())
    names = set()
    at_import = (n for n, inside_function in runtime_nodes(tree) if not inside_function)
    for node in ast.walk(tree) if deferred else at_import:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"vae", "__future__"}


def _serving(root: Path) -> list[str]:
    return [module_name(p, root / "vae") for p in _files(root, "vae/serving")]


def test_every_import_follows_the_rooms() -> None:
    wrong = wrong_arrows(REPO)
    assert not wrong, "imports against the rooms (ALLOWED):\n" + "\n".join(wrong)


def test_serving_never_reaches_training_evaluation_or_the_stages() -> None:
    """Not even inside functions: the core install lacks the extras those rooms need."""
    assert reaches(REPO, _serving(REPO), {"training", "evaluation", "stages"}, True) == []


def test_serving_imports_only_the_core_install() -> None:
    found = {}
    for module in closure(_serving(REPO), deferred=False):
        path = module_file(module)
        if path is not None and (extra := _third_party(path, False) - CORE_INSTALL):
            found[module] = extra
    assert found == {}


def test_core_imports_only_torch_and_inside_functions_the_mixture_fit() -> None:
    for path in _files(REPO, "vae/core"):
        assert _third_party(path, False) <= {"torch"}, path
        assert _third_party(path, True) <= {"torch", "safetensors", "sklearn"}, path


def test_pipelines_import_no_maths() -> None:
    imports = set()
    for path in _files(REPO, "pipelines"):
        imports |= {i.module for i in vae_imports(path, REPO / "vae")}
    assert reaches(REPO, sorted(imports), {"core", "data", "training", "evaluation"}, True) == []


def test_each_room_opens_with_a_one_line_docstring_and_exports_nothing() -> None:
    for init in sorted((REPO / "vae").glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree)
        assert doc and "\n" not in doc, init
        assert len(tree.body) == 1, f"{init}: a docstring only, no re-exports"


def lengths(root: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(function lengths, module lengths) over :data:`CHECKED`, longest first."""
    functions, modules = [], []
    for folder in CHECKED:
        for path in _files(root, folder):
            text = path.read_text()
            name = str(path.relative_to(root))
            modules.append((len(text.splitlines()), name))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    functions.append((length, f"{name}:{node.name}"))
    return sorted(functions, reverse=True), sorted(modules, reverse=True)


def test_no_function_runs_over_80_lines_and_no_module_over_350() -> None:
    functions, modules = lengths(REPO)
    for length, name in functions[:5] + modules[:5]:
        print(f"{length:4d} {name}")
    assert [f for f in functions if f[0] > FUNCTION_LIMIT] == []
    assert [m for m in modules if m[0] > MODULE_LIMIT] == []


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """A tree whose every rule is broken once."""
    for room in ("core", "training", "serving", "evaluation"):
        (tmp_path / "vae" / room).mkdir(parents=True)
        (tmp_path / "vae" / room / "__init__.py").write_text('"""A room."""\n')
    (tmp_path / "vae" / "__init__.py").write_text("")
    (tmp_path / "vae" / "config.py").write_text("")
    (tmp_path / "vae" / "core" / "model.py").write_text(
        "def f():\n    from vae.training import train\n"
    )
    (tmp_path / "vae" / "training" / "train.py").write_text("from vae.mlops import x\n")
    (tmp_path / "vae" / "serving" / "consume.py").write_text("import vae.evaluation.score\n")
    (tmp_path / "vae" / "evaluation" / "score.py").write_text("x = 1\n" * (MODULE_LIMIT + 1))
    body = "".join(f"    x{i} = {i}\n" for i in range(FUNCTION_LIMIT))
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "flows.py").write_text(f"def long():\n{body}")
    return tmp_path


def test_each_rule_fails_on_a_tree_that_breaks_it(broken: Path) -> None:
    assert wrong_arrows(broken) == [
        "vae.core.model imports vae.training (inside a function, line 2)",
        "vae.core.model imports vae.training.train (inside a function, line 2)",
        "vae.serving.consume imports vae.evaluation (at import time, line 1)",
        "vae.serving.consume imports vae.evaluation.score (at import time, line 1)",
    ]  # vae.mlops does not exist in this tree: an import of nothing is no arrow
    serving = ["vae.serving.consume"]
    assert reaches(broken, serving, {"evaluation"}, False) == [
        "vae.evaluation",
        "vae.evaluation.score",
    ]
    functions, modules = lengths(broken)
    assert functions[0] == (FUNCTION_LIMIT + 1, "pipelines/flows.py:long")
    assert modules[0] == (MODULE_LIMIT + 1, "vae/evaluation/score.py")
