"""Any model URI, for people who don't want to write code: encode, sample, reconstruct.

These are the library behind ``vae encode``, ``vae sample`` and ``vae reconstruct``. They load a
model through ``mlflow.pyfunc`` (``models:/NAME@alias``, ``models:/NAME/3``, ``runs:/...`` or a
local model folder) and call its ``predict`` exactly as any consumer would, so an embedding
written here equals the pyfunc's ``encode`` mode bit for bit.

Outside a project there is no default store: the tracking URI comes from ``--tracking-uri`` or
``MLFLOW_TRACKING_URI``, or from an ``mlflow.db`` in the working directory. A SQLite store that
does not exist is an error, never a new empty file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vae.config import MAX_IMAGE_PIXELS, ModelConfig
from vae.data.images import Batch, count_images, expand_inputs, iter_batches
from vae.errors import PermanentError

__all__ = [
    "ConsumerError",
    "LoadedModel",
    "embedding_columns",
    "embedding_table",
    "encode_to_parquet",
    "image_grid",
    "load_model",
    "reconstruct_grid",
    "resolve_tracking_uri",
    "sample_grid",
]

BATCH = 512


class ConsumerError(PermanentError, RuntimeError):
    """A model that cannot be found or loaded, in one line."""


def resolve_tracking_uri(model_uri: str, flag: str | None = None) -> str | None:
    """The store to read ``model_uri`` from; ``None`` for a local model folder."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None and (Path.cwd() / "mlflow.db").is_file():
        uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    needs_store = model_uri.startswith(("models:/", "runs:/"))
    if uri is None:
        if needs_store:
            raise ConsumerError(
                f"{model_uri}: which MLflow store? Set MLFLOW_TRACKING_URI or pass "
                "--tracking-uri (there is no mlflow.db in this folder)"
            )
        return None
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise ConsumerError(f"tracking URI {uri}: {db} does not exist (not creating it)")
    return uri


class LoadedModel:
    """A pyfunc model and the image shape it takes, read from its own ``vae.json``."""

    def __init__(self, pyfunc: Any, local: Path) -> None:
        meta = json.loads((local / "data" / "vae" / "vae.json").read_text())
        self.pyfunc = pyfunc
        self.local = local  # the downloaded model folder: later readers see the same version
        self.image_shape: tuple[int, ...] = tuple(meta["image_shape"])
        self.code_dim: int = ModelConfig.from_saved(meta["model"]).code_dim  # all layers

    def predict(self, x: np.ndarray, **params: Any) -> np.ndarray:
        from mlflow.exceptions import MlflowException

        try:
            return np.asarray(self.pyfunc.predict(x, params=params))
        except MlflowException as exc:  # the model refused the request: say why, in one line
            raise ConsumerError(exc.message.splitlines()[0]) from None


@contextlib.contextmanager
def _using_store(uri: str | None) -> Iterator[None]:
    """MLflow's global tracking URI (and the variable it mirrors) set to ``uri`` for a while.

    ``download_artifacts`` takes the store as an argument, but resolving a registered version's
    ``models:/m-...`` source inside it reads the global URI, whose default would create
    ``./mlflow.db``. Restoring both keeps a library call from redirecting the caller's MLflow.
    """
    if uri is None:
        yield
        return
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def load_model(model_uri: str, tracking_uri: str | None = None) -> LoadedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(model_uri, tracking_uri)
    try:
        with _using_store(uri):
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=model_uri, tracking_uri=uri, registry_uri=uri
                )
            )
        if not (local / "data" / "vae" / "vae.json").is_file():
            raise ConsumerError(f"{model_uri}: not a model logged by this package (no data/vae)")
        return LoadedModel(mlflow.pyfunc.load_model(str(local)), local)
    except MlflowException as exc:
        raise ConsumerError(f"{model_uri}: cannot load ({_why(exc)})") from None


def _why(exc: Any) -> str:
    """An MLflow failure in a few words: a server's 401/403 says what to set."""
    if exc.error_code == "UNAUTHENTICATED":
        return (
            "the tracking server says you are not authenticated; set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD"
        )
    if exc.error_code == "PERMISSION_DENIED":
        return "the tracking server denies this user permission to read it"
    return str(exc.message).splitlines()[0]


def embedding_columns(code_dim: int) -> list[str]:
    return ["source"] + [f"{k}_{i}" for k in ("mu", "logvar") for i in range(code_dim)]


def embedding_table(sources: Sequence[str], posterior: np.ndarray) -> Any:
    """One Arrow table: ``source``, ``mu_0..``, ``logvar_0..`` from the (B, 2D) encode output."""
    import pyarrow as pa

    d = posterior.shape[1] // 2
    names = embedding_columns(d)
    columns = [pa.array(list(sources), pa.string())]
    columns += [pa.array(posterior[:, i], pa.float32()) for i in range(2 * d)]
    return pa.Table.from_arrays(columns, names=names)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=None if enabled else True, dynamic_ncols=True)


def encode_to_parquet(
    model: LoadedModel,
    inputs: Sequence[str | Path],
    out: Path,
    batch_size: int = BATCH,
    progress: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Write one row per input image to ``out`` (Parquet, one row group a batch); an image
    declaring more than ``max_pixels`` pixels is refused undecoded (vae.data.images)."""
    import pyarrow.parquet as pq

    from vae.atomic import atomic_open

    paths = expand_inputs(inputs)
    total, start, rows = count_images(paths), time.perf_counter(), 0
    with atomic_open(out, "wb") as f, _progress(total, progress) as bar:
        empty = embedding_table([], np.zeros((0, 2 * model.code_dim), np.float32))
        writer = pq.ParquetWriter(f, empty.schema)
        try:
            for batch in iter_batches(paths, model.image_shape, batch_size, max_pixels):
                post = model.predict(_flat(batch), mode="encode", logvar=True, uint8=True)
                writer.write_table(embedding_table(batch.sources, post))
                rows += len(batch.sources)
                bar.update(len(batch.sources))
        finally:  # before atomic_open closes (or, on error, discards) the file
            writer.close()
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "rows_per_second": rows / max(seconds, 1e-9)}


def _flat(batch: Batch) -> np.ndarray:
    """The signature's input: (B, C*H*W) float32 holding 0..255 (``uint8`` params)."""
    return batch.pixels.reshape(len(batch.pixels), -1).astype(np.float32)


def image_grid(images: np.ndarray, ncol: int = 8, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> one (H', W', C) uint8 picture, ``ncol`` per row."""
    n, c, h, w = images.shape
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    pixels = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    for i, img in enumerate(pixels):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid


def _save_png(grid: np.ndarray, out: Path) -> None:
    from PIL import Image

    from vae.atomic import atomic_write_with

    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    atomic_write_with(out, lambda tmp: img.save(tmp, format="PNG"))


def sample_grid(
    model: LoadedModel, n: int, out: Path, seed: int = 0, sample: bool = False
) -> np.ndarray:
    """``n`` new images (decoder means, or samples with ``sample``) as a PNG grid: z from the
    sampler the model was registered with (``generate.sampler``, at its temperature)."""
    d = math.prod(model.image_shape)
    x = model.predict(np.zeros((1, d), np.float32), mode="generate", n=n, seed=seed, sample=sample)
    images = x.reshape(n, *model.image_shape)
    _save_png(image_grid(images, ncol=min(n, 8)), out)
    return images


def reconstruct_grid(
    model: LoadedModel,
    inputs: Sequence[str | Path],
    out: Path,
    n: int = 32,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """The first ``n`` inputs over their reconstructions: rows of 8 originals, then 8 decoded."""
    paths = expand_inputs(inputs)
    batch = next(iter_batches(paths, model.image_shape, n, max_pixels))
    x_hat = model.predict(_flat(batch), mode="reconstruct", uint8=True)
    originals = batch.pixels.astype(np.float32) / 255.0
    decoded = x_hat.reshape(originals.shape)
    rows = []
    for start in range(0, len(originals), 8):
        rows += [originals[start : start + 8], decoded[start : start + 8]]
    pad = [np.zeros((8 - len(r), *r.shape[1:]), np.float32) for r in rows]
    stacked = np.concatenate([np.concatenate([r, p]) for r, p in zip(rows, pad, strict=True)])
    _save_png(image_grid(stacked, ncol=8), out)
    return decoded
