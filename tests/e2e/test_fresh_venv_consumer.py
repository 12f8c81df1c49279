"""The registry consumer, as a stranger meets it: a fresh venv with only the model's declared
requirements (then the core ``vae`` install), another working directory, a real ``mlflow
server`` holding the registry, and ``mlflow models serve`` on 127.0.0.1.

One venv per test run (module scope): building it costs a pip install of torch and mlflow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import (
    REPO,
    free_port,
    models_serve_args,
    post_json,
    serving,
    start_server,
    stop_server,
    tiny_vae,
)
from tests.conftest import tracking_server_args as server_args

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these

NAME = "consumer-vae"
LATENT = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, torch.nn.Module]]:
    """A real tracking server with ``NAME@champion`` registered by the package's own code."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from vae.mlops.packaging import log_model

    root = tmp_path_factory.mktemp("server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = start_server(server_args(port, root), f"{uri}/health", root, dict(os.environ))
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        model = tiny_vae(LATENT)
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("consumer")).info.run_id
        version = mlflow.register_model(log_model(model, run_id), NAME).version
        client.set_registered_model_alias(NAME, "champion", version)
        yield uri, model
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
        stop_server(proc)


def _venv_env(venv: Path, uri: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    path = f"{venv / 'bin'}{os.pathsep}{keep.get('PATH', '')}"
    return {**keep, "PATH": path, "MLFLOW_TRACKING_URI": uri, "VIRTUAL_ENV": str(venv)}


def _pip(venv: Path, *args: str) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def consumer_venv(
    store: tuple[str, torch.nn.Module], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A venv holding exactly ``get_model_dependencies(models:/NAME@champion)``."""
    import mlflow

    venv = tmp_path_factory.mktemp("consumer") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    requirements = mlflow.pyfunc.get_model_dependencies(f"models:/{NAME}@champion")
    pins = Path(requirements).read_text().split()
    assert sorted(p.split("==")[0] for p in pins) == ["mlflow", "numpy", "safetensors", "torch"]
    _pip(venv, "-r", requirements)
    return venv


def _python(venv: Path, code: str, cwd: Path, uri: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        cwd=cwd,
        env=_venv_env(venv, uri),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _expected(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.encode(torch.from_numpy(x).reshape(-1, 1, 28, 28)).mean.numpy()


def test_champion_loads_in_a_venv_without_the_repository(
    store: tuple[str, torch.nn.Module], consumer_venv: Path, tmp_path: Path
) -> None:
    uri, model = store
    x = np.random.default_rng(0).random((6, 784), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import importlib.util as u, json, sys, mlflow, numpy as np\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "z = m.predict(np.load('x.npy'))\n"
        "np.save('z.npy', z)\n"
        "print(json.dumps({'vae': sys.modules['vae'].__file__,"
        " 'missing': [p for p in ('dvc', 'prefect', 'torchvision')"
        " if u.find_spec(p)]}))\n"
    )
    out = _python(consumer_venv, code, tmp_path, uri)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert "/code/vae/__init__.py" in info["vae"], info  # the model's own copy
    assert info["missing"] == [], "the consumer venv must hold only the model's requirements"
    np.testing.assert_allclose(
        np.load(tmp_path / "z.npy"), _expected(model, x), rtol=1e-5, atol=1e-6
    )


def test_models_serve_from_the_consumer_venv(
    store: tuple[str, torch.nn.Module], consumer_venv: Path, tmp_path: Path
) -> None:
    uri, model = store
    port = free_port()
    args = models_serve_args(consumer_venv / "bin" / "mlflow", f"models:/{NAME}@champion", port)
    env = _venv_env(consumer_venv, uri)
    x = np.random.default_rng(1).random((4, 784), dtype=np.float32)
    with serving(args, f"http://127.0.0.1:{port}/ping", tmp_path, env, consumer_venv / "bin"):
        status, body = post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": x.tolist()})
    assert status == 200, body
    np.testing.assert_allclose(body["predictions"], _expected(model, x), rtol=1e-5, atol=1e-6)


def test_a_version_from_before_the_move_runs_its_own_code(
    store: tuple[str, torch.nn.Module], consumer_venv: Path, tmp_path: Path
) -> None:
    """The model logged with the flat vae/ (tests/fixtures/pre_move_model), in the venv that
    holds only its requirements, from another folder: it imports the flat modules it ships.
    Before test_core_install_runs_the_consumer_commands, which installs today's vae here."""
    uri, _ = store
    old = REPO / "tests" / "fixtures" / "pre_move_model"
    shutil.copytree(old / "model", tmp_path / "model")
    code = (
        "import json, sys, mlflow, numpy as np\n"
        "m = mlflow.pyfunc.load_model('model')\n"
        f"x = np.load({str(old / 'x.npy')!r})\n"
        "np.save('encode.npy', m.predict(x))\n"
        "np.save('generate.npy', m.predict(x[:1], params={'mode': 'generate', 'n': 3}))\n"
        "print(json.dumps({'vae': sys.modules['vae'].__file__,"
        " 'flat': 'vae.model' in sys.modules, 'rooms': 'vae.core' in sys.modules}))\n"
    )
    out = _python(consumer_venv, code, tmp_path, uri)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["vae"] == str(tmp_path / "model" / "code" / "vae" / "__init__.py"), info
    assert info["flat"] and not info["rooms"], info  # the old layout's own modules
    for mode in ("encode", "generate"):
        np.testing.assert_allclose(
            np.load(tmp_path / f"{mode}.npy"), np.load(old / f"{mode}.npy"), rtol=1e-5, atol=1e-6
        )


def test_core_install_runs_the_consumer_commands(
    store: tuple[str, torch.nn.Module], consumer_venv: Path, tmp_path: Path
) -> None:
    """``pip install vae`` (no extras) on top: the CLI works, and DVC/Prefect stay out."""
    from PIL import Image

    uri, model = store
    _pip(consumer_venv, "-c", str(REPO / "requirements.lock"), str(REPO))
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    (tmp_path / "pngs").mkdir()
    for i, img in enumerate(pixels):
        Image.fromarray(img).convert("RGB").save(tmp_path / "pngs" / f"{i}.png")
    vae = str(consumer_venv / "bin" / "vae")
    env = _venv_env(consumer_venv, uri)
    for args in (
        ["encode", "--model", f"models:/{NAME}@champion", "pngs", "--out", "e.parquet"],
        ["sample", "--model", f"models:/{NAME}/1", "-n", "8", "--out", "s.png"],
        ["reconstruct", "--model", f"models:/{NAME}@champion", "pngs", "--out", "r.png"],
    ):
        out = subprocess.run(
            [vae, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, (args, out.stderr)
    import pandas as pd

    table = pd.read_parquet(tmp_path / "e.parquet")
    assert list(table["source"]) == [f"pngs/{i}.png" for i in range(5)]
    mu = table[[f"mu_{i}" for i in range(LATENT)]].to_numpy()
    expected = _expected(model, pixels.reshape(5, 784).astype(np.float32) / 255.0)
    np.testing.assert_allclose(mu, expected, rtol=1e-5, atol=1e-6)
    assert Image.open(tmp_path / "s.png").size == (8 * 30 + 2, 30 + 2)
    probe = "import importlib.util as u; print([p for p in ('dvc', 'prefect') if u.find_spec(p)])"
    assert _python(consumer_venv, probe, tmp_path, uri).stdout.strip() == "[]"
    for args, extra in (
        (["train"], "vae[pipeline]"),
        (["encode", "--model", f"models:/{NAME}/1", "pngs", "--out", "x", "--engine", "spark"],
         "vae[spark]"),
    ):  # fmt: skip
        out = subprocess.run(
            [vae, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 1 and extra in out.stderr, out.stderr


@pytest.mark.download
@pytest.mark.parametrize("manager", ["virtualenv", "uv"])
def test_env_managers_that_build_their_own_env(
    store: tuple[str, torch.nn.Module], tmp_path: Path, manager: str
) -> None:
    """MLflow builds the model's env itself (pyenv/virtualenv or uv): large downloads."""
    uri, model = store
    x = np.random.default_rng(3).random((2, 784), dtype=np.float32)
    (tmp_path / "in.json").write_text(json.dumps({"inputs": x.tolist()}))
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    args = ["models", "predict", "-m", f"models:/{NAME}@champion", "-i", "in.json"]
    out = subprocess.run(
        [mlflow_bin, *args, "-o", "out.json", "--env-manager", manager],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert out.returncode == 0, out.stderr
    predictions = json.loads((tmp_path / "out.json").read_text())["predictions"]
    np.testing.assert_allclose(predictions, _expected(model, x), rtol=1e-5, atol=1e-6)
