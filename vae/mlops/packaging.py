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
    "describe_registered_model",
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


def log_model(
    model: VAE, run_id: str, model_id: str | None = None, example: np.ndarray | None = None
) -> str:
    """Log ``model`` into run ``run_id`` as a self-contained pyfunc model; returns its URI.

    ``model_id``: the run's logged model (created by ``vae train``), which gets the files the
    first time; otherwise (or when it has them already) MLflow creates one. ``example``: the
    input example, (1, C*H*W) float32 (a real test image; a blank one when not given).
    """
    import mlflow

    from vae.mlops.store import tracking_uri

    if example is None:
        example = np.zeros((1, math.prod(model.image_shape)), dtype=np.float32)
    mlflow.set_tracking_uri(tracking_uri())
    with tempfile.TemporaryDirectory() as tmp:
        save_vae_dir(model.cpu(), Path(tmp) / "data" / "vae")
        code = ship_code(Path(tmp) / "code")
        kwargs = {
            "name": "model",
            "loader_module": LOADER,
            "data_path": str(Path(tmp) / "data" / "vae"),
            "code_paths": [str(code)],
            "signature": pyfunc_signature(model.image_shape),
            "input_example": example,
            "pip_requirements": requirements(),
        }
        client = mlflow.MlflowClient()
        if model_id is not None and client.get_logged_model(model_id).status.value != "PENDING":
            model_id = None  # it holds files already, maybe a registered version's: keep them
        if model_id is None:
            with mlflow.start_run(run_id=run_id):
                return str(mlflow.pyfunc.log_model(**kwargs).model_uri)
        # Into the run's logged model, outside the run: MLflow would otherwise copy every
        # step-0 metric of the run onto the model, and fail on those already linked to it.
        info = mlflow.pyfunc.log_model(model_id=model_id, **kwargs)
    from mlflow.entities import LoggedModelOutput

    client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
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
        f"`reconstruct` (N, {d}) decoder means; `generate` (n, {d}) decoder means of draws "
        "from the sampler the pipeline chose (`generate.sampler`).\n\n"
        f"**Usage:**\n\n```python\n{usage_snippet(model_uri, shape)}```\n\n"
        f"**Source run:** `{run_id}`. Needs only `mlflow.pyfunc.get_model_dependencies`: the "
        "inference code ships in the model's `code/` folder.\n"
    )


def describe_registered_model(name: str, model: VAE) -> tuple[str, dict[str, str]]:
    """The registered model's own page (Markdown) and tags: what it is, the gate, how to load."""
    c = model.cfg
    text = (
        f"**{name}**: a variational autoencoder of {'·'.join(map(str, model.image_shape))} "
        f"images ({c.arch}, {c.code_dim}-dimensional codes, {c.prior} prior, {c.likelihood} "
        "decoder), trained, evaluated and registered by the `vae` pipeline (`dvc repro`).\n\n"
        "**The gate:** every pipeline run registers a new version with the alias `challenger`; "
        "`champion` moves to it only if its importance-weighted test `nll_iw` (nats per image, "
        "lower is better) is below the champion's on the same test data and estimator, the "
        "champion being re-scored when those differ. A version without a finite `nll_iw` is "
        "never promoted. Each version's tags hold its test metrics and DVC's data hashes; its "
        "description links its model card.\n\n"
        "**Load the champion:**\n\n```python\n"
        f"{usage_snippet(f'models:/{name}@champion', model.image_shape)}```\n\n"
        f"or `vae encode --model models:/{name}@champion photos/ --out codes.parquet`; serve it: "
        f"`mlflow models serve -m models:/{name}@champion`.\n"
    )
    tags = {"task": "representation learning, generation", "framework": "pytorch"}
    tags["input"] = f"float32 (N, {math.prod(model.image_shape)}) pixels in [0, 1]"
    return text, tags
