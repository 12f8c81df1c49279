"""What a logged model carries: its inference code, signature, requirements and description.

A registered version must load wherever MLflow is, without this repository. So the logged model
ships a trimmed copy of this package, ``code/vae/``: the ``vae/core/`` folder whole, and the
modules that :mod:`vae.pyfunc` imports, transitively (:func:`shipped_files`, read off the import
graph: no list kept by hand). It goes as a package folder, not as loose files: MLflow copies each
of ``code_paths`` by its base name and puts ``code/`` first on ``sys.path``, so loose files would
break ``import vae.core.model`` (and a file named like a stdlib module would shadow it).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vae.core.model import VAE
from vae.imports import ROOT, closure, module_file, module_name
from vae.pyfunc import DEFAULT_PARAMS, MAX_ROWS, save_vae_dir

__all__ = [
    "LOADER",
    "describe_version",
    "log_model",
    "pyfunc_signature",
    "requirements",
    "ship_code",
    "shipped_files",
    "usage_snippet",
]

LOADER = "vae.pyfunc"  # the loader module every registered version's MLmodel names


def shipped_files(root: Path = ROOT) -> list[str]:
    """The files of ``code/vae/``, relative to the package: ``core/`` whole, and every module
    that :data:`LOADER` and ``core`` import, transitively (their parent packages included)."""
    core = [module_name(p, root) for p in sorted((root / "core").glob("**/*.py"))]
    files = {module_file(m, root) for m in closure([LOADER, *core], root=root)}
    return sorted(str(p.relative_to(root)) for p in files if p is not None)


def ship_code(dest: Path) -> Path:
    """Copy :func:`shipped_files` into ``dest/vae`` (a package folder); returns that folder."""
    pkg = dest / "vae"
    for name in shipped_files():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, pkg / name)
    return pkg


def pyfunc_signature(image_shape: tuple[int, ...]) -> Any:
    """(N, C*H*W) float32 in; a float32 matrix out; the ``mode``/``n``/... params.

    MLflow enforces the input schema before ``predict``: a float64 array or an (N, C, H, W)
    one is refused there, with a message naming the expected shape and dtype.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    types = {str: "string", int: "long", bool: "boolean"}
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, math.prod(image_shape)))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        params=ParamSchema([ParamSpec(k, types[type(v)], v) for k, v in DEFAULT_PARAMS.items()]),
    )


def requirements() -> list[str]:
    """The pins a consumer installs (``mlflow.pyfunc.get_model_dependencies``)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "numpy", "safetensors", "mlflow")]


def log_model(model: VAE, run_id: str) -> str:
    """Log ``model`` into run ``run_id`` as a self-contained pyfunc model; returns its URI."""
    import mlflow

    from vae.mlops.store import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    with tempfile.TemporaryDirectory() as tmp:
        save_vae_dir(model.cpu(), Path(tmp) / "data" / "vae")
        code = ship_code(Path(tmp) / "code")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                loader_module=LOADER,
                data_path=str(Path(tmp) / "data" / "vae"),
                code_paths=[str(code)],
                signature=pyfunc_signature(model.image_shape),
                input_example=np.zeros((1, math.prod(model.image_shape)), dtype=np.float32),
                pip_requirements=requirements(),
            )
    return str(info.model_uri)


def usage_snippet(model_uri: str, image_shape: tuple[int, ...]) -> str:
    """Three lines that load the version and encode two images."""
    d = math.prod(image_shape)
    return (
        "import mlflow, numpy as np\n"
        f'model = mlflow.pyfunc.load_model("{model_uri}")\n'
        f"z = model.predict(np.random.rand(2, {d}).astype(np.float32))  # (2, latent_dim)\n"
    )


def describe_version(
    model: VAE, model_uri: str, run_id: str, metrics: dict[str, Any] | None
) -> str:
    """The registry UI's description of a version (Markdown): input, output, usage, source."""
    c, shape = model.cfg, model.image_shape
    d, dims = math.prod(shape), "·".join(map(str, shape))
    nll = (metrics or {}).get("nll_iw")
    score = f" Test nll_iw: {float(nll):.2f} nats." if nll is not None else ""
    return (
        f"VAE ({c.arch}, latent_dim {c.latent_dim} x {c.latent_layers} layer(s), "
        f"{c.likelihood} decoder).{score}\n\n"
        f"**Input:** float32 array (N, {d}) = (N, {dims}), pixels in [0, 1], row-major. "
        'Raw 0..255 pixels: params `{"uint8": true}`. '
        f"At most {MAX_ROWS} rows a request (`VAE_MAX_ROWS` where it is served).\n\n"
        f"**Output** (params `mode`): `encode` (N, {c.code_dim}) posterior means "
        f'(`"logvar": true`: (N, {2 * c.code_dim}), means then log-variances); '
        f"`reconstruct` (N, {d}) decoder means; `generate` (n, {d}) from the prior.\n\n"
        f"**Usage:**\n\n```python\n{usage_snippet(model_uri, shape)}```\n\n"
        f"**Source run:** `{run_id}`. Needs only `mlflow.pyfunc.get_model_dependencies`: the "
        "inference code ships in the model's `code/` folder.\n"
    )
