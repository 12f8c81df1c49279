"""Splits: the Split type and data errors; load a prepared split, draw float batches on its device.

The whole split sits on the device as uint8 (47 MB for Fashion-MNIST); batches are drawn by
indexing it and converted here, binarized afresh (``dynamic``) or once (``float_images``).
:mod:`vae.data.prepare` writes the splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vae.errors import PermanentError, RetryableError

__all__ = [
    "DataError",
    "DataUnavailable",
    "Split",
    "batch_to_float",
    "float_images",
    "load_split",
]


class DataError(PermanentError, RuntimeError):
    """A dataset problem, with a message that names the file."""


class DataUnavailable(RetryableError, DataError):
    """The download failed: trying again later may work."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64; -1 where unlabelled

    def __len__(self) -> int:
        return self.images.shape[0]


def load_split(path: str | Path, device: torch.device | str = "cpu") -> Split:
    """Load a prepared split onto ``device`` (uint8 stays uint8: 1 byte a pixel)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prepared split not found; run `vae prepare` first")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = obj["images"], obj["labels"]
    except Exception as exc:  # noqa: BLE001 - whatever is wrong, name the file
        raise DataError(f"{path}: not a prepared split ({type(exc).__name__}: {exc})") from None
    if images.dtype != torch.uint8 or images.ndim != 4 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{path}: expected uint8 images (N, C, H, W) and N labels")
    non_blocking = torch.device(device).type == "cuda"
    if non_blocking:
        images, labels = images.pin_memory(), labels.pin_memory()
    return Split(
        images.to(device, non_blocking=non_blocking), labels.to(device, non_blocking=non_blocking)
    )


def batch_to_float(
    images: torch.Tensor,
    binarize: str,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1]; ``dynamic`` draws a fresh Bernoulli sample.

    With ``uniform`` (B, C, H, W) in [0, 1), the sample is ``uniform < pixel``: the caller owns
    the noise (the training loop draws it for the global batch, so DDP ranks agree).
    """
    x = images.float().div_(255.0)
    if binarize == "dynamic":
        x = torch.bernoulli(x, generator=generator) if uniform is None else (uniform < x).float()
    return x


def float_images(split: Split, binarize: str, seed: int) -> torch.Tensor:
    """A whole split as float images in [0, 1], on its device.

    ``dynamic`` data is binarized once with ``seed``, so evaluation sees one fixed sample.
    """
    gen = torch.Generator(device=split.images.device).manual_seed(seed)
    return batch_to_float(split.images, binarize, gen)
