"""The registered model's pyfunc interface, as an MLflow *loader module* (no pickled code).

The MLflow model directory holds ``data/vae/weights.safetensors`` (tensors only),
``data/vae/vae.json`` (what rebuilds the model) and ``code/vae/``, a copy of the few modules that
rebuild and run it (:func:`vae.mlops.packaging.shipped_files`). MLflow puts ``code/`` on
``sys.path``, so a consumer needs only MLflow and the model's requirements, not this repository::

    model = mlflow.pyfunc.load_model("models:/vae-fashion-mnist@champion")
    z = model.predict(images)                                      # (N, code_dim) means
    x_hat = model.predict(images, params={"mode": "reconstruct"})  # (N, C*H*W) decoder means
    x_new = model.predict(images[:1], params={"mode": "generate", "n": 16, "seed": 0})

Images are float32 (N, C*H*W) in [0, 1], the signature's input schema; with
``params={"uint8": True}`` they are 0..255 pixel values instead (JSON has no uint8, so this is
how a REST client sends raw pixels). ``"logvar": True`` makes ``encode`` return
``[mu | logvar]``, (N, 2 * code_dim). ``generate`` draws z from the sampler the pipeline
chose (``generate.sampler``: the prior, or a mixture or diffusion model fitted to the codes, at
``generate.temperature``). Bad input
raises ``MlflowException (INVALID_PARAMETER_VALUE)``, which the scoring server turns into an
HTTP 400 with the message.

A request of more than ``max_rows`` images (default :data:`MAX_ROWS`) is refused: MLflow's
scoring server has no body-size limit of its own. The environment sets it where the model is
loaded, ``VAE_MAX_ROWS=N mlflow models serve ...``, since MLflow passes a load-time model config
only for keys logged with the model, and those would land in the training run's params.

This module ships inside every registered model: it imports only torch, numpy, the standard
library and the other inference modules, and mlflow only when it raises.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae.config import ModelConfig
from vae.core.model import VAE
from vae.core.sampler import SAMPLER_FILE, load_sampler, save_sampler

__all__ = [
    "DEFAULT_PARAMS",
    "MAX_ROWS",
    "MODES",
    "VAEPyfunc",
    "images_from_input",
    "load_vae_dir",
    "save_vae_dir",
]

WEIGHTS, META = "weights.safetensors", "vae.json"
MODES = ("encode", "reconstruct", "generate")
DEFAULT_PARAMS: dict[str, Any] = {
    "mode": "encode",
    "n": 16,
    "seed": 0,
    "sample": False,
    "logvar": False,
    "uint8": False,
}
MAX_ROWS = 10_000  # 10k Fashion-MNIST rows are ~60 MB of JSON: a request, not a batch job


def save_vae_dir(model: VAE, path: Path) -> None:
    """Write the weights (safetensors) and the model's params (JSON) into ``path``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS))
    if (density := model.latent_sampler) is not None:
        save_sampler(
            path / SAMPLER_FILE, density.kind, {density.kind: density}, density.temperature
        )
    meta = {"model": model.cfg.__dict__, "image_shape": list(model.image_shape), "format": 1}
    (path / META).write_text(json.dumps(meta, indent=2) + "\n")


def load_vae_dir(path: str | Path, device: str | torch.device = "cpu") -> VAE:
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / META).read_text())
    model = VAE(ModelConfig.from_saved(meta["model"]), tuple(meta["image_shape"]))
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    if (path / SAMPLER_FILE).is_file():  # versions logged before samplers existed have none
        kind, fitted = load_sampler(path / SAMPLER_FILE)
        model.latent_sampler = fitted.get(kind)
    return model.to(device).eval()


def _invalid(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def images_from_input(
    model_input: Any, image_shape: tuple[int, ...], uint8: bool = False
) -> torch.Tensor:
    """Validate and convert pyfunc input to a float32 (N, C, H, W) tensor in [0, 1].

    ``uint8``: the values are 0..255 pixels (any numeric dtype, since JSON has no uint8).
    """
    if hasattr(model_input, "to_numpy"):  # pandas DataFrame / Series
        model_input = model_input.to_numpy()
    if isinstance(model_input, dict) and len(model_input) == 1:  # {"images": [...]} etc.
        model_input = next(iter(model_input.values()))
    try:
        arr = np.asarray(model_input)
    except (ValueError, TypeError) as exc:
        raise _invalid(f"input is not an array of images ({exc})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise _invalid(f"input must be numeric, got dtype {arr.dtype}")
    d = math.prod(image_shape)
    if arr.ndim == 2 and arr.shape[1] == d:
        arr = arr.reshape(-1, *image_shape)
    elif arr.ndim != 4 or tuple(arr.shape[1:]) != tuple(image_shape):
        raise _invalid(
            f"input shape {arr.shape} is not (N, {d}) or (N, {', '.join(map(str, image_shape))})"
        )
    if arr.shape[0] == 0:
        raise _invalid("input has no images")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise _invalid("input contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if uint8:
        if lo < 0 or hi > 255 or not np.array_equal(arr, np.round(arr)):
            raise _invalid(f"params.uint8: pixels must be integers in 0..255, got [{lo:g}, {hi:g}]")
        arr /= 255.0
    elif lo < 0.0 or hi > 1.0:
        hint = '; for 0..255 pixels pass params {"uint8": true}' if hi <= 255 and lo >= 0 else ""
        raise _invalid(f"pixel values must be in [0, 1], got [{lo:g}, {hi:g}]{hint}")
    return torch.from_numpy(arr)


class VAEPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(images, params) -> np.ndarray``."""

    def __init__(self, model: VAE, max_rows: int = MAX_ROWS) -> None:
        self.model = model.eval()
        self.max_rows = int(max_rows)

    def _check_rows(self, n: int, what: str) -> None:
        if n > self.max_rows:
            raise _invalid(
                f"{what} {n} rows, more than this model's max_rows of {self.max_rows} per request; "
                "split it into smaller requests (the server sets the limit with VAE_MAX_ROWS)"
            )

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        p = {**DEFAULT_PARAMS, **(params or {})}
        mode = p["mode"]
        if mode not in MODES:
            raise _invalid(f"params.mode: {mode!r} is not one of {', '.join(MODES)}")
        with torch.no_grad():
            if mode == "generate":
                n = int(p["n"])
                if n < 1:
                    raise _invalid(f"params.n: {n} is out of range; expected at least 1")
                self._check_rows(n, "params.n asks for")
                gen = torch.Generator().manual_seed(int(p["seed"]))
                out = self.model.generate(n, gen, mean=not bool(p["sample"]))
                return out.flatten(1).numpy()
            x = images_from_input(model_input, self.model.image_shape, bool(p["uint8"]))
            self._check_rows(x.shape[0], "the input has")
            q = self.model.encode(x)
            if mode == "encode":
                out = torch.cat([q.mean, q.logvar], 1) if p["logvar"] else q.mean
                return out.numpy()
            return self.model.decode(q.mean).mean.flatten(1).numpy()


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> VAEPyfunc:
    """MLflow's loader-module entry point; ``VAE_MAX_ROWS`` sets the rows a request."""
    raw = os.environ.get("VAE_MAX_ROWS", str(MAX_ROWS))
    try:
        max_rows = int(raw)
        if max_rows < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"VAE_MAX_ROWS: {raw!r} is not a whole number of at least 1") from None
    return VAEPyfunc(load_vae_dir(data_path), max_rows)
