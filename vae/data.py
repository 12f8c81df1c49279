"""Datasets: find the raw files offline, check them, and write compact prepared splits.

Raw Fashion-MNIST / MNIST files are looked for in this order:

1. the project's raw folder, ``data/raw/<dataset>/`` (a user's copy, or ``dvc pull``);
2. the Debian package's copy (``apt-get install dataset-fashion-mnist``);
3. torchvision's download, for machines with internet.

``prepare`` writes ``{train,val,test}.pt`` (a dict of uint8 images (N, C, H, W) and int64
labels (N,), loadable with ``weights_only=True``) and ``manifest.json`` (counts, shapes and the
sha256 of each raw file's decompressed IDX content, so a copy that is gzipped or not hashes the
same). Raw files are never edited.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vae.config import DataConfig
from vae.io import atomic_torch_save, atomic_write_json

__all__ = [
    "DataError",
    "DataUnavailable",
    "Split",
    "SYSTEM_DIRS",
    "batch_to_float",
    "float_images",
    "find_raw_files",
    "load_split",
    "prepare",
    "read_idx",
]

log = logging.getLogger(__name__)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),
    "mnist": (Path("/usr/share/datasets/mnist"),),
}
DEBIAN_PACKAGES = {"fashion_mnist": "dataset-fashion-mnist", "mnist": "dataset-mnist"}
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


class DataError(RuntimeError):
    """A dataset problem, with a message that names the file."""


class DataUnavailable(DataError):
    """No source had the raw files and the download failed: trying again later may work."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64; -1 where unlabelled

    def __len__(self) -> int:
        return self.images.shape[0]


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


def _idx_in(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in IDX_FILES.items():
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                found[key] = folder / name
                break
        else:
            return None
    return found


def find_raw_files(
    dataset: str,
    raw_dir: Path,
    system_dirs: tuple[Path, ...] | None = None,
    download: bool = True,
) -> tuple[dict[str, Path], str]:
    """Locate the four IDX files; return them and a word for where they came from."""
    local = [raw_dir / dataset, raw_dir / "torchvision" / TORCHVISION[dataset] / "raw"]
    for folder in local:
        if files := _idx_in(folder):
            return files, f"project copy ({folder})"
    system_dirs = SYSTEM_DIRS[dataset] if system_dirs is None else system_dirs
    for folder in system_dirs:
        if files := _idx_in(folder):
            return files, f"Debian package ({folder})"
    error = ""
    if download:
        try:
            import torchvision.datasets as tvd

            getattr(tvd, TORCHVISION[dataset])(root=str(raw_dir / "torchvision"), download=True)
            if files := _idx_in(local[1]):
                return files, "torchvision download"
        except Exception as exc:  # noqa: BLE001 - any failure means "not this way"
            error = f" ({type(exc).__name__}: {str(exc)[:200]})"
    names = ", ".join(s + "[.gz]" for s in IDX_FILES.values())
    raise (DataUnavailable if error else DataError)(
        f"{dataset}: raw files not found. Tried (1) the project copy in {local[0]}/ "
        f"(put {names} there, or run `dvc pull`); (2) the Debian copy in "
        f"{', '.join(map(str, system_dirs)) or '(none)'} "
        f"(`apt-get install -y {DEBIAN_PACKAGES[dataset]}`); (3) torchvision's download"
        f"{' (disabled)' if not download else ''}{error}."
    )


def _load_idx_splits(files: dict[str, Path]) -> tuple[dict[str, Split], dict[str, str]]:
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
    return splits, hashes


# ---------------------------------------------------------------------------------------------
# A folder of images


def _load_folder(folder: Path) -> tuple[Split, list[str], dict[str, str]]:
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: the image folder is empty")
    classes = sorted({p.parent.name for p in files if p.parent != folder})
    images, labels, hashes = [], [], {}
    shape = None
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{p}: not an image file (expected one of {sorted(IMAGE_SUFFIXES)})")
        try:
            with Image.open(p) as im:
                im.load()
                arr = _pil_to_uint8(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{p}: cannot read the image ({exc})") from None
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise DataError(
                f"{p}: image shape {tuple(arr.shape)} differs from {tuple(shape)} "
                f"of {files[0]}; all images must have one size and mode"
            )
        images.append(arr)
        labels.append(classes.index(p.parent.name) if p.parent != folder else -1)
        hashes[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.long)), classes, hashes


def _pil_to_uint8(im: Any) -> torch.Tensor:
    import numpy as np

    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB" if im.mode in ("RGBA", "P", "CMYK") else "L")
    arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# prepare


def _split_off(split: Split, fraction: float, gen: torch.Generator) -> tuple[Split, Split]:
    n = len(split)
    n_held = max(1, round(n * fraction))
    if n_held >= n:
        raise DataError(f"data.val_fraction: holding out {n_held} of {n} images leaves none")
    perm = torch.randperm(n, generator=gen)
    keep, held = perm[n_held:].sort().values, perm[:n_held].sort().values
    return (
        Split(split.images[keep], split.labels[keep]),
        Split(split.images[held], split.labels[held]),
    )


def prepare(
    cfg: DataConfig,
    out_dir: Path,
    raw_dir: Path = Path("data/raw"),
    system_dirs: tuple[Path, ...] | None = None,
    download: bool = True,
    strict: bool = False,
) -> dict[str, Any]:
    """Read the raw dataset, hold out validation, write the splits and return the manifest.

    If ``out_dir`` already holds a manifest whose raw-file sha256 differ from the files read
    now, the changed files are named in a warning, or, with ``strict``, in a :class:`DataError`
    before anything is written.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.dataset == "folder":
        assert cfg.folder is not None
        everything, classes, hashes = _load_folder(Path(cfg.folder))
        rest, test = _split_off(everything, cfg.val_fraction, gen)
        source = f"image folder ({cfg.folder})"
    else:
        files, source = find_raw_files(cfg.dataset, raw_dir, system_dirs, download)
        splits, hashes = _load_idx_splits(files)
        rest, test = splits["train"], splits["test"]
        classes = CLASSES[cfg.dataset]
    train, val = _split_off(rest, cfg.val_fraction, gen)
    splits = {"train": train, "val": val, "test": test}
    if cfg.binarize == "static":  # sampled once, with the data seed; later reads are fixed
        splits = {k: Split(binarize_uint8(s.images, gen), s.labels) for k, s in splits.items()}
    manifest = {
        "dataset": cfg.dataset,
        "source": source,
        "binarize": cfg.binarize,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "classes": classes,
        "image_shape": list(train.images.shape[1:]),
        "splits": {k: {"count": len(s), "shape": list(s.images.shape)} for k, s in splits.items()},
        "raw_sha256": dict(sorted(hashes.items())),
        "dataset_sha256": hashlib.sha256(
            "".join(f"{k}:{v}\n" for k, v in sorted(hashes.items())).encode()
        ).hexdigest(),
    }
    _check_raw_hashes(out_dir / "manifest.json", manifest["raw_sha256"], strict)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, s in splits.items():
        atomic_torch_save(out_dir / f"{name}.pt", {"images": s.images, "labels": s.labels})
    atomic_write_json(out_dir / "manifest.json", manifest)
    log.info(
        "prepared %s from %s: %s",
        cfg.dataset,
        source,
        ", ".join(f"{k}={len(s)}" for k, s in splits.items()),
    )
    return manifest


def _check_raw_hashes(previous: Path, hashes: dict[str, str], strict: bool) -> None:
    if not previous.is_file():
        return
    try:
        old = json.loads(previous.read_text()).get("raw_sha256", {})
    except (OSError, ValueError):
        return  # an unreadable old manifest is simply replaced
    changed = sorted(k for k in set(old) | set(hashes) if old.get(k) != hashes.get(k))
    if not changed:
        return
    msg = f"{previous}: raw files differ from the ones it was prepared from: {', '.join(changed)}"
    if strict:
        raise DataError(msg + "; rerun without --strict to accept the new data")
    log.warning("%s; preparing from the new files", msg)


def binarize_uint8(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x ~ Bernoulli(pixel / 255), stored as 0 or 255 so it stays uint8."""
    p = images.float() / 255.0
    return (torch.bernoulli(p, generator=gen) * 255).to(torch.uint8)


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
