"""The registered model's pyfunc interface, as an MLflow *loader module* (no pickled code).

The MLflow model directory holds ``data/weights.safetensors`` (tensors only) and
``data/vae.json`` (what rebuilds the model); ``_load_pyfunc`` reads them with this package's
own code. So loading a registered model never unpickles anything, and a consumer needs only this
package installed::

    model = mlflow.pyfunc.load_model("models:/vae-fashion-mnist@champion")
    z = model.predict(images)                                   # (N, latent_dim) posterior means
    x_hat = model.predict(images, params={"mode": "reconstruct"})  # (N, 784) decoder means
    x_new = model.predict(images[:1], params={"mode": "generate", "n": 16, "seed": 0})

Images are (N, C*H*W) or (N, C, H, W) floats in [0, 1], as a numpy array, a DataFrame or a
nested list. Bad input raises ``MlflowException(INVALID_PARAMETER_VALUE)``, which the scoring
server turns into an HTTP 400 with the message.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae.config import ModelConfig
from vae.model import VAE

__all__ = ["MODES", "VAEPyfunc", "load_vae_dir", "save_vae_dir"]

WEIGHTS, META = "weights.safetensors", "vae.json"
MODES = ("encode", "reconstruct", "generate")
DEFAULT_PARAMS: dict[str, Any] = {"mode": "encode", "n": 16, "seed": 0, "sample": False}


def save_vae_dir(model: VAE, path: Path) -> None:
    """Write the weights (safetensors) and the model's params (JSON) into ``path``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS))
    meta = {"model": model.cfg.__dict__, "image_shape": list(model.image_shape), "format": 1}
    (path / META).write_text(json.dumps(meta, indent=2) + "\n")


def load_vae_dir(path: str | Path, device: str | torch.device = "cpu") -> VAE:
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / META).read_text())
    model = VAE(ModelConfig.from_saved(meta["model"]), tuple(meta["image_shape"]))
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    return model.to(device).eval()


def _invalid(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def images_from_input(model_input: Any, image_shape: tuple[int, ...]) -> torch.Tensor:
    """Validate and convert pyfunc input to a float32 (N, C, H, W) tensor in [0, 1]."""
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
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise _invalid(f"pixel values must be in [0, 1], got [{arr.min():g}, {arr.max():g}]")
    return torch.from_numpy(arr)


class VAEPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(images, params) -> np.ndarray``."""

    def __init__(self, model: VAE) -> None:
        self.model = model.eval()

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        p = {**DEFAULT_PARAMS, **(params or {})}
        mode = p["mode"]
        if mode not in MODES:
            raise _invalid(f"params.mode: {mode!r} is not one of {', '.join(MODES)}")
        with torch.no_grad():
            if mode == "generate":
                n = int(p["n"])
                if not 1 <= n <= 100_000:
                    raise _invalid(f"params.n: {n} is out of range; expected 1..100000")
                gen = torch.Generator().manual_seed(int(p["seed"]))
                out = self.model.generate(n, gen, mean=not bool(p["sample"]))
                return out.flatten(1).numpy()
            x = images_from_input(model_input, self.model.image_shape)
            q = self.model.encode(x)
            if mode == "encode":
                return q.mean.numpy()
            return self.model.decode(q.mean).mean().flatten(1).numpy()


def _load_pyfunc(data_path: str) -> VAEPyfunc:
    """MLflow's loader-module entry point."""
    return VAEPyfunc(load_vae_dir(data_path))
