"""Raw data: read and check a source folder, snapshot it for DVC, or download it.

A source is one folder, ``data.source`` in ``params.yaml``:

- ``fashion_mnist`` / ``mnist``: the four original IDX files (gzipped or not), as Debian's
  ``dataset-fashion-mnist`` ships them in ``/usr/share/datasets/fashion-mnist``;
- ``folder``: same-sized images (PNG, JPEG, ...), with one sub-folder per class for labels.

``ingest`` checks every file of the source and copies the folder, byte for byte, to
``data/raw``, the output of DVC's ``ingest`` stage. DVC hashes the source (an external
dependency when it lies outside the repository) and the copy, so a file added, removed or
changed in the source reruns ``ingest`` and everything downstream, and the copy can be pushed to
a DVC remote. Because the copy is exact, DVC records the same hash for both. Raw files are never
edited.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vae.config import MAX_IMAGE_PIXELS
from vae.data.images import InputError, open_image
from vae.data.splits import DataError, DataUnavailable, Split

__all__ = [
    "CLASSES",
    "DEBIAN_SOURCES",
    "IDX_FILES",
    "RawData",
    "check_source",
    "download",
    "idx_files",
    "ingest",
    "read_idx",
    "read_source",
]

log = logging.getLogger(__name__)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Where Debian's packages put each IDX dataset, and the package that does.
DEBIAN_SOURCES = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist", "dataset-fashion-mnist"),
    "mnist": ("/usr/share/datasets/mnist", "dataset-mnist"),
}
CLASSES = {
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
    "mnist": [str(i) for i in range(10)],
}
TORCHVISION = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class RawData:
    """A checked source: its splits (``train`` and ``test`` for IDX, ``all`` for a folder)."""

    splits: dict[str, Split]
    classes: list[str]
    # file (relative to the source) -> sha256 of its content; for a folder, in image order
    sha256: dict[str, str]


# ---------------------------------------------------------------------------------------------
# IDX files


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc}); the file is corrupt or truncated") from None


def read_idx(path: Path, expect_ndim: int) -> tuple[torch.Tensor, str]:
    """Read an unsigned-byte IDX file. Returns the tensor and the sha256 of its content."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expect_ndim:
        found = raw[:4].hex() if len(raw) >= 4 else "nothing"
        raise DataError(
            f"{path}: wrong IDX magic number {found}; expected 000008{expect_ndim:02x} "
            f"(unsigned bytes, {expect_ndim} dimension(s))"
        )
    header = 4 + 4 * expect_ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(expect_ndim)]
    n = 1
    for d in dims:
        n *= d
    if len(raw) != header + n:
        raise DataError(
            f"{path}: truncated or corrupt IDX file: header says {dims} ({header + n} bytes) "
            f"but the file has {len(raw)} bytes"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)
    return data, hashlib.sha256(raw).hexdigest()


def idx_files(folder: Path) -> dict[str, Path]:
    """The four IDX files in ``folder`` (gzipped or not), by role; a DataError names the missing."""
    found, missing = {}, []
    for key, stem in IDX_FILES.items():
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                found[key] = folder / name
                break
        else:
            missing.append(stem + "[.gz]")
    if missing:
        raise DataError(f"{folder}: missing IDX file(s) {', '.join(missing)}")
    return found


def _read_idx_source(folder: Path, dataset: str) -> RawData:
    files = idx_files(folder)
    tensors, hashes = {}, {}
    for key, path in files.items():
        ndim = 3 if key.endswith("images") else 1
        tensors[key], hashes[path.name.removesuffix(".gz")] = read_idx(path, ndim)
    splits = {}
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{files[f'{split}_labels']}: {labels.shape[0]} labels but "
                f"{files[f'{split}_images'].name} has {images.shape[0]} images"
            )
        if tuple(images.shape[1:]) != (28, 28):
            raise DataError(
                f"{files[f'{split}_images']}: images are {tuple(images.shape[1:])}; expected 28x28"
            )
        if labels.numel() and int(labels.max()) > 9:
            raise DataError(f"{files[f'{split}_labels']}: label {int(labels.max())} is not 0-9")
        splits[split] = Split(images.unsqueeze(1).contiguous(), labels.long())
    return RawData(splits, CLASSES[dataset], hashes)


# ---------------------------------------------------------------------------------------------
# A folder of images


def _image_files(folder: Path) -> list[Path]:
    # Hidden files (.DS_Store, editor swap files) are not images and are not read.
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise DataError(f"{folder}: the image folder is empty")
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{p}: not an image file (expected one of {sorted(IMAGE_SUFFIXES)})")
    return files


def _read_image(path: Path, max_pixels: int) -> torch.Tensor:
    import numpy as np

    try:
        with open_image(path, str(path), max_pixels, "data.max_image_pixels") as im:
            im.load()  # decodes every byte: a truncated file fails here
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB" if im.mode in ("RGBA", "P", "CMYK") else "L")
            arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    except InputError as exc:
        raise DataError(str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image ({exc})") from None
    return arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1).contiguous()


def _read_folder_source(folder: Path, max_pixels: int) -> RawData:
    files = _image_files(folder)
    classes = sorted({p.parent.name for p in files if p.parent != folder})
    images = [_read_image(p, max_pixels) for p in files]
    shapes = collections.Counter(tuple(im.shape) for im in images)
    if len(shapes) > 1:  # name an odd one out, measured against the most common shape
        common, count = shapes.most_common(1)[0]
        odd = next(p for p, im in zip(files, images, strict=True) if tuple(im.shape) != common)
        shape = tuple(images[files.index(odd)].shape)
        raise DataError(
            f"{odd}: image shape {shape} (C, H, W) differs from {common} of {count} other "
            "image(s); all images must have one size and mode"
        )
    labels = [classes.index(p.parent.name) if p.parent != folder else -1 for p in files]
    hashes = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    everything = Split(torch.stack(images), torch.tensor(labels, dtype=torch.long))
    return RawData({"all": everything}, classes, hashes)


# ---------------------------------------------------------------------------------------------
# Reading, checking, ingesting and downloading a source


def read_source(dataset: str, folder: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> RawData:
    """Read and check every file of a source folder; a bad file is named in a DataError. An
    image of a folder source that declares more than ``max_pixels`` pixels, or several frames,
    is refused before it is decoded (``data.max_image_pixels``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not found or not a folder")
    if dataset == "folder":
        return _read_folder_source(folder, max_pixels)
    return _read_idx_source(folder, dataset)


def missing_source_hint(dataset: str, source: str) -> str:
    """How to get a source that is not there, in one sentence."""
    debian = DEBIAN_SOURCES.get(dataset)
    if debian and Path(source) == Path(debian[0]):
        return (
            f"install Debian's copy (`apt-get install -y {debian[1]}`), or run "
            f"`vae download --out DIR` and set data.source: DIR"
        )
    if dataset == "folder":
        return "point data.source at a folder of images"
    return "point data.source at a folder with the four IDX files, or run `vae download --out DIR`"


def check_source(dataset: str, source: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> RawData:
    """:func:`read_source` with a hint on how to get a source that is missing."""
    if not Path(source).exists():
        raise DataError(
            f"data.source: {source} not found; {missing_source_hint(dataset, str(source))}"
        )
    return read_source(dataset, source, max_pixels)


def ingest(
    dataset: str, source: str | Path, out: str | Path, max_pixels: int = MAX_IMAGE_PIXELS
) -> dict[str, Any]:
    """Check ``source``, then replace ``out`` with an exact copy of it; returns a summary.

    Nothing is written unless every file of the source reads: a corrupt new file fails here,
    before DVC reaches ``prepare``, so the prepared data and the models stay as they were.
    """
    source, out = Path(source), Path(out)
    raw = check_source(dataset, source, max_pixels)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True, symlinks=False)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = {name: len(split) for name, split in raw.splits.items()}
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info(
        "ingested %s from %s into %s: %s images, %d files, %.1f MB",
        dataset,
        source,
        out,
        " + ".join(f"{n} {k}" for k, n in counts.items()),
        len(raw.sha256),
        size / 1e6,
    )
    return {"source": str(source), "images": counts, "files": len(raw.sha256), "bytes": size}


def download(dataset: str, out: str | Path) -> Path:
    """Download an IDX dataset with torchvision into ``out`` (the four .gz files).

    For machines with internet and no Debian package; raises :class:`DataUnavailable` (worth a
    retry) when the download fails.
    """
    if dataset not in TORCHVISION:
        raise DataError(f"data.dataset: {dataset!r} has nothing to download")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="vae-download-") as tmp:
        try:
            import torchvision.datasets as tvd

            getattr(tvd, TORCHVISION[dataset])(root=tmp, download=True)
        except Exception as exc:  # noqa: BLE001 - any failure means "not now"
            raise DataUnavailable(
                f"{dataset}: torchvision's download failed ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
        fetched = Path(tmp) / TORCHVISION[dataset] / "raw"
        out.mkdir(parents=True, exist_ok=True)
        for stem in IDX_FILES.values():
            with contextlib.suppress(FileNotFoundError):
                shutil.copyfile(fetched / f"{stem}.gz", out / f"{stem}.gz")
    idx_files(out)  # all four arrived
    return out
