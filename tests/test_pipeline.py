"""The whole DVC pipeline, end to end, on tiny data, in a throw-away git repository."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.conftest import TINY_PARAMS, write_idx_dataset
from tests.test_evaluate import KEYS
from tests.test_export import SCORE_KEYS

REPO = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "train", "evaluate", "export", "generate", "register"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    return env


def _run(cwd: Path, *args: str) -> str:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("proj")
    shutil.copytree(REPO / "vae", root / "vae", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    write_idx_dataset(root / "data" / "raw" / "fashion_mnist", n_train=200, n_test=50)
    (root / ".gitignore").write_text("/data/raw/\n__pycache__/\n")
    _run(root, "git", "init", "-q")
    _run(root, sys.executable, "-m", "dvc", "init", "-q")
    _run(root, sys.executable, "-m", "dvc", "repro")
    return root


def test_repo_dvc_yaml_has_the_stage_chain() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == STAGES
    for name, stage in stages.items():
        assert stage["cmd"] == f"vae {name}"
        for dep in stage["deps"]:
            assert (REPO / dep).exists() or not dep.startswith("vae/"), dep


def test_pipeline_outputs(pipeline_repo: Path) -> None:
    root = pipeline_repo
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["epochs"] == TINY_PARAMS["train"]["epochs"]
    ev = json.loads((root / "metrics/eval.json").read_text())
    for key in KEYS:
        assert key in ev, key
    assert ev["iw_samples"] == TINY_PARAMS["evaluate"]["iw_samples"]
    assert ev["nll_iw"] <= -ev["elbo"] + 1e-6 and ev["elbo_gap"] >= 0
    assert len(ev["kl_per_dim"]) == TINY_PARAMS["model"]["latent_dim"]
    down = json.loads((root / "metrics/downstream.json").read_text())
    for key in SCORE_KEYS:
        assert 0.0 <= down[key] <= 1.0, key
    d = TINY_PARAMS["model"]["latent_dim"]
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    for split in ("train", "val", "test"):
        df = pd.read_parquet(root / "data/embeddings" / f"{split}.parquet")
        assert len(df) == manifest["splits"][split]["count"]
        expected = ["split", "index", "label"] + [f"mu_{i}" for i in range(d)]
        expected += [f"logvar_{i}" for i in range(d)]
        assert list(df.columns) == expected
        assert (df["split"] == split).all() and df["index"].tolist() == list(range(len(df)))
    for name in ("samples", "samples_stochastic", "reconstructions", "interpolations", "latent_2d"):
        with Image.open(root / "reports" / f"{name}.png") as im:
            assert im.size[0] > 0
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)


def test_second_repro_changes_nothing(pipeline_repo: Path) -> None:
    out = _run(pipeline_repo, sys.executable, "-m", "dvc", "repro")
    assert "up to date" in out.lower(), out
    for stage in STAGES:
        assert f"Running stage '{stage}'" not in out


def test_experiment_with_set_params(pipeline_repo: Path) -> None:
    root = pipeline_repo
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-qm", "tiny pipeline")
    _run(
        root,
        sys.executable,
        "-m",
        "dvc",
        "exp",
        "run",
        "-S",
        "train.epochs=1",
        "-S",
        "evaluate.iw_samples=4",
    )
    assert json.loads((root / "metrics/train.json").read_text())["epochs"] == 1
    assert json.loads((root / "metrics/eval.json").read_text())["iw_samples"] == 4
    shown = _run(root, sys.executable, "-m", "dvc", "exp", "show", "--csv")
    assert "nll_iw" in shown


def _vae_imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vae"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vae"))
    return {m for m in found if (REPO / (m.replace(".", "/") + ".py")).is_file()}


def test_stage_deps_list_every_module_the_stage_imports() -> None:
    """dvc.yaml stays true: each stage's deps name every vae/ module its command can import."""
    stages_py = ast.parse((REPO / "vae/stages.py").read_text())
    functions = {f.name: f for f in stages_py.body if isinstance(f, ast.FunctionDef)}
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, spec in dvc.items():
        cmd = functions[f"cmd_{stage.replace('-', '_')}"]
        called = {
            n.func.id
            for n in ast.walk(cmd)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in functions
        }
        todo = _vae_imports(cmd) | set().union(*(_vae_imports(functions[f]) for f in called))
        seen: set[str] = set()
        while todo:
            mod = todo.pop()
            if mod not in seen:
                seen.add(mod)
                todo |= _vae_imports(
                    ast.parse((REPO / (mod.replace(".", "/") + ".py")).read_text())
                )
        needed = {m.replace(".", "/") + ".py" for m in seen} - {"vae/__init__.py"}
        missing = needed - set(spec["deps"])
        assert not missing, f"{stage}: add {sorted(missing)} to its deps in dvc.yaml"
