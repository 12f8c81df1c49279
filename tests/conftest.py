"""Shared fixtures: tiny IDX datasets written by the tests themselves, tiny params, and tiny
git + DVC projects built like the real one."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from vae.data.raw import IDX_FILES

pytest_plugins = ["tests.xdist_groups"]
os.environ.setdefault("MPLBACKEND", "Agg")
REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "data": {
        "dataset": "fashion_mnist",
        "val_fraction": 0.2,
        "binarize": "dynamic",
        "seed": 0,
        "max_image_pixels": 16777216,  # dvc.yaml lists it: DVC needs every listed param
    },
    "model": {
        "arch": "mlp",
        "latent_dim": 4,
        "hidden_dim": 32,
        "hidden_layers": 1,
        "prior": "standard",
    },
    "train": {
        "epochs": 2,
        "batch_size": 32,
        "lr": 0.003,
        "seed": 0,
        "device": "cpu",
        "ema_decay": 0.0,
        "grad_clip": 0.0,
        "kl_warmup_steps": 0,
    },
    "evaluate": {"iw_samples": 8, "batch_size": 50},
    "export": {"batch_size": 64, "knn_k": 3, "probe_max_iter": 200},
    "generate": {
        "n_samples": 16,
        "nrow": 4,
        "n_reconstructions": 8,
        "n_interpolations": 2,
        "interpolation_steps": 5,
        "sampler": "diffusion",  # the path with a fitted density, the longer one
        "diffusion_hidden": 16,
        "diffusion_blocks": 1,
        "diffusion_epochs": 2,
        "diffusion_steps": 5,
    },
    "score": {
        "n_samples": 40,
        "neighbours": 3,
        "classifier_epochs": 1,
        "classifier_batch_size": 128,
        "classifier_lr": 0.001,
        "classifier_features": 16,
        "feature_net": "auto",
        "seed": 0,
    },
    "mlflow": {
        "enabled": False,
        "experiment": "tiny",
        "registered_model": "tiny-vae",
        "register_experiments": False,
        "image_every": 1,
    },
    "schedule": {"cron": "0 3 * * 1", "timezone": "UTC"},
}


def idx_bytes(array: torch.Tensor) -> bytes:
    """Serialise a uint8 tensor in the IDX format (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.contiguous().numpy().tobytes()


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n 28x28 uint8 images of 10 classes: each class a bright bar at its own position."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 2 + 2 * y : 5 + 2 * y, 4:24] = 230
    return images, labels.to(torch.uint8)


def write_idx_dataset(folder: Path, n_train: int = 200, n_test: int = 50, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = synthetic_images(n, seed)
        for kind, arr in (("images", images), ("labels", labels)):
            stem = IDX_FILES[f"{split}_{kind}"]
            data = idx_bytes(arr)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data, mtime=0))
            else:
                (folder / stem).write_bytes(data)
    return folder


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tmp project folder (the cwd) with tiny raw IDX data and tiny params.yaml."""
    write_idx_dataset(tmp_path / "data" / "raw")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_params(path: Path, **sections: dict) -> None:
    params = {k: dict(v) for k, v in TINY_PARAMS.items()}
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for commands the tests run: this venv first, no analytics, a git user."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        DVC_NO_ANALYTICS="1",
        DO_NOT_TRACK="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    env.update(extra)
    return env


def run(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run a command, fail the test with its output if it fails; returns stdout + stderr."""
    proc = subprocess.run(
        args, cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def dvc(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return run(cwd, sys.executable, "-m", "dvc", *args, env=env)


def tiny_params(**sections: dict[str, Any]) -> dict[str, Any]:
    params = {k: dict(v) for k, v in TINY_PARAMS.items()}
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    return params


def make_dvc_project(root: Path, source: Path, **sections: dict[str, Any]) -> Path:
    """A git + DVC project at ``root`` built from this repository's own dvc.yaml, .dvc/config,
    .gitignore and vae/, with tiny params reading ``source``; everything committed."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "vae", root / "vae", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    data = {"source": str(source), **sections.pop("data", {})}
    params = tiny_params(data=data, **sections)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(root, "git", "init", "-q", "-b", "main")
    dvc(root, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the default remote too
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "tiny project")
    return root


def assert_generates_without_sklearn(model_dir: Path, check: str = "") -> None:
    """A consumer's process loads the saved model dir, generates from it, and never imports
    scikit-learn (the mixture's fit needs it; sampling must not); ``check`` is more Python run
    there, with the loaded model as ``m``."""
    code = (
        "import sys; from vae.pyfunc import load_vae_dir; import torch\n"
        f"m = load_vae_dir({str(model_dir)!r}); m.generate(3, torch.Generator())\n"
        f"{check}\n"
        "assert 'sklearn' not in sys.modules, 'sklearn was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as dead (an orphan killed in a container may
    linger as one when PID 1 does not reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


# ---------------------------------------------------------------------------------------------
# Servers on 127.0.0.1 (MLflow tracking servers, `mlflow models serve`) and tiny models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def project_env(root: Path, uri: str) -> Iterator[None]:
    """cwd = root and MLFLOW_TRACKING_URI = uri, restored afterwards."""
    old_cwd, old_uri = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise TimeoutError(url)


def start_server(
    args: list[str], health: str, cwd: Path, env: dict, bin_dir: Path | None = None
) -> subprocess.Popen:
    """Start a server in its own process group (it finds uvicorn on PATH, in ``bin_dir`` or
    this venv's); wait until healthy."""
    bin_dir = bin_dir or Path(sys.executable).parent
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runner: 8 processes fewer
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_http(health, proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


@contextlib.contextmanager
def serving(
    args: list[str], health: str, cwd: Path, env: dict, bin_dir: Path | None = None
) -> Iterator[None]:
    proc = start_server(args, health, cwd, env, bin_dir)
    try:
        yield
    finally:
        stop_server(proc)


def models_serve_args(mlflow_bin: str | Path, model_uri: str, port: int) -> list[str]:
    """``mlflow models serve`` of ``model_uri`` in the current env, one worker on 127.0.0.1."""
    return [
        str(mlflow_bin),
        *("models", "serve", "-m", model_uri, "--env-manager", "local"),
        *("-h", "127.0.0.1", "-p", str(port), "-w", "1"),
    ]


def tracking_server_args(port: int, server_dir: Path) -> list[str]:
    server_dir.mkdir(parents=True, exist_ok=True)
    return [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{server_dir / 'backend.db'}",
        "--artifacts-destination",
        str(server_dir / "artifacts"),
    ]


def post_json(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def mlp_config(**model: Any):
    """A ModelConfig of the one-hidden-layer MLP (the small model the unit tests use), whatever
    params.yaml's defaults are; ``model`` overrides any key."""
    from vae.config import ModelConfig

    return ModelConfig(**{"arch": "mlp", "hidden_layers": 1, "prior": "standard", **model})


def tiny_vae(latent_dim: int = 3, hidden_dim: int = 16, shape: tuple[int, ...] = (1, 28, 28)):
    """A seeded, untrained MLP VAE: enough for anything that only loads, logs or encodes."""
    from vae.core.model import VAE

    torch.manual_seed(0)
    return VAE(mlp_config(latent_dim=latent_dim, hidden_dim=hidden_dim), shape).eval()
