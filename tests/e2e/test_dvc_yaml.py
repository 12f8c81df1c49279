"""dvc.yaml against the code: the stage chain, and each stage's deps naming every vae/ module its
command can import (so a change to one reruns exactly the stages it affects)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.e2e.test_pipeline import STAGES
from vae.imports import closure, imports_in, module_file, vae_imports

REPO = Path(__file__).resolve().parents[2]


def test_repo_dvc_yaml_has_the_stage_chain() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == STAGES
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m vae {name}"
        for dep in stage["deps"]:
            assert (REPO / dep).exists() or not dep.startswith("vae/"), dep


def stage_deps(stage: str) -> set[str]:
    """The vae/ files that ``vae <stage>`` can import: its command function, the stage helpers
    it calls (transitively), and what their imports import (vae.imports; package __init__
    files hold a docstring only, tests/test_layout.py)."""
    stages_py = ast.parse((REPO / "vae/stages.py").read_text())
    functions = {f.name: f for f in stages_py.body if isinstance(f, ast.FunctionDef)}
    todo, seen = [f"cmd_{stage.replace('-', '_')}"], set()
    while todo:
        if (name := todo.pop()) in seen:
            continue
        seen.add(name)
        todo += [
            n.func.id
            for n in ast.walk(functions[name])
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in functions
        ]
    roots = {"vae.stages", *(i.module for f in seen for i in imports_in(functions[f]))}
    roots.discard("vae.stages")  # its module-level imports only: config, outputs, errors
    roots |= {i.module for i in vae_imports(REPO / "vae/stages.py") if not i.deferred}
    files = {module_file(m) for m in closure(roots)}
    return {str(p.relative_to(REPO)) for p in files if p and p.name != "__init__.py"}


def test_stage_deps_list_every_module_the_stage_imports() -> None:
    """dvc.yaml stays true: each stage's deps name every vae/ module its command can import."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, spec in dvc.items():
        missing = stage_deps(stage) - set(spec["deps"])
        assert not missing, f"{stage}: add {sorted(missing)} to its deps in dvc.yaml"
