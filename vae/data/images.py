"""Images as users have them: PNG/JPEG files, folders of them, and IDX files, in uint8 batches.

The consumer commands (``vae encode``, ``vae reconstruct``) and the Spark path read inputs
through here, so a file is decoded, converted and checked the same way everywhere: the mode is
converted to the model's (RGB to grey for a one-channel model), and an image of another size is
refused with one line naming the file and the size expected. Nothing is resized: a silently
resized image would give a plausible, wrong embedding.

Files are hostile until their header says otherwise (:func:`open_image`, also used by the folder
dataset of :mod:`vae.data.raw`): an image that declares more than ``max_pixels`` pixels (a PNG of
a few kilobytes can decode to gigabytes) or more than one frame (animated GIF or PNG,
multi-page TIFF: which frame would the model see?) is refused before a pixel is decoded, and a
file PIL cannot read (truncated, lying about its size, a text chunk that inflates past PIL's
limit) is one line, never a traceback.

Reading streams: one batch of uint8 pixels in memory at a time, whatever the input's size.
"""

from __future__ import annotations

import gzip
import io
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from vae.config import MAX_IMAGE_PIXELS
from vae.errors import PermanentError

__all__ = [
    "IMAGE_SUFFIXES",
    "Batch",
    "InputError",
    "count_images",
    "decode_image",
    "expand_inputs",
    "is_idx",
    "iter_batches",
    "open_image",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class InputError(PermanentError, ValueError):
    """An input the model cannot take (missing, unreadable, wrong size), in one line."""


@dataclass(frozen=True)
class Batch:
    sources: list[str]  # the file, or "<IDX file>#<index>"
    pixels: np.ndarray  # (B, C, H, W) uint8


def open_image(
    fp: str | Path | IO[bytes], source: str, max_pixels: int, setting: str = "--max-pixels"
) -> Any:
    """Open an image (header only) and check what it declares: at most ``max_pixels`` pixels
    and one frame. Returns the unloaded ``PIL.Image``; an :class:`InputError` names the file,
    what it declares and the ``setting`` that raises the limit."""
    from PIL import Image, UnidentifiedImageError

    too_big = f"over the limit of {max_pixels:,} ({setting}); not decoded"
    try:
        with warnings.catch_warnings():  # our limit decides, not PIL's warning threshold
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as exc:  # past 2 x PIL's MAX_IMAGE_PIXELS
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        n = f"{int(declared.group(1)):,}" if declared else "too many"
        raise InputError(f"{source}: the header declares {n} pixels, {too_big}") from None
    except UnidentifiedImageError:
        raise InputError(f"{source}: not a readable image (no image format recognised)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{source}: not a readable image ({exc})") from None
    (w, h), frames = img.size, getattr(img, "n_frames", 1)
    if w * h > max_pixels:
        img.close()
        raise InputError(f"{source}: the header declares {w}x{h} = {w * h:,} pixels, {too_big}")
    if frames > 1:
        img.close()
        raise InputError(
            f"{source}: {frames} frames (an animated or multi-frame image); give each frame as "
            "its own file"
        )
    return img


def decode_image(
    data: bytes, shape: tuple[int, ...], source: str, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """PNG/JPEG bytes -> (C, H, W) uint8 in the model's mode; refuses another size (before
    decoding) and anything :func:`open_image` refuses."""
    c, h, w = shape
    with open_image(io.BytesIO(data), source, max_pixels) as img:
        if img.size != (w, h):
            raise InputError(
                f"{source}: image is {img.size[0]}x{img.size[1]}, the model expects {w}x{h}"
            )
        try:
            img.load()
            converted = img.convert("L" if c == 1 else "RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"{source}: not a readable image ({exc})") from None
    arr = np.asarray(converted, dtype=np.uint8)
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


def is_idx(path: Path) -> bool:
    """An IDX image file, by name (``*idx3-ubyte``, gzipped or not, or ``*.idx``)."""
    return "idx3-ubyte" in path.name or path.suffix == ".idx"


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders as their image files, sorted, recursively."""
    paths: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise InputError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} files in this folder")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return paths


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_header(f: IO[bytes], path: Path) -> tuple[int, int, int]:
    head = f.read(16)
    if len(head) < 16 or head[:4] != b"\x00\x00\x08\x03":
        raise InputError(f"{path}: not an IDX image file (magic 00000803, unsigned bytes, 3-D)")
    n, h, w = (int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
    return n, h, w


def count_images(paths: Sequence[Path]) -> int:
    """How many images ``paths`` hold (IDX files by their header): the progress bar's total."""
    total = 0
    for path in paths:
        if is_idx(path):
            with _open(path) as f:
                total += _idx_header(f, path)[0]
        else:
            total += 1
    return total


def _idx_batches(path: Path, shape: tuple[int, ...], size: int) -> Iterator[Batch]:
    c, h, w = shape
    with _open(path) as f:
        n, fh, fw = _idx_header(f, path)
        if (fh, fw) != (h, w):
            raise InputError(f"{path}: images are {fw}x{fh}, the model expects {w}x{h}")
        for start in range(0, n, size):
            count = min(size, n - start)
            data = f.read(count * h * w)
            if len(data) != count * h * w:
                raise InputError(f"{path}: truncated IDX file: image {start} of {n} is cut off")
            pixels = np.frombuffer(data, np.uint8).reshape(count, 1, h, w)
            if c != 1:  # grey IDX images for a colour model: the same grey in every channel
                pixels = np.repeat(pixels, c, axis=1)
            yield Batch([f"{path}#{i}" for i in range(start, start + count)], pixels)


def iter_batches(
    paths: Sequence[Path], shape: tuple[int, ...], size: int, max_pixels: int = MAX_IMAGE_PIXELS
) -> Iterator[Batch]:
    """Stream ``paths`` as uint8 batches of at most ``size`` images, in order."""
    sources: list[str] = []
    images: list[np.ndarray] = []
    for path in paths:
        if is_idx(path):
            if images:
                yield Batch(sources, np.stack(images))
                sources, images = [], []
            yield from _idx_batches(path, shape, size)
            continue
        images.append(decode_image(path.read_bytes(), shape, str(path), max_pixels))
        sources.append(str(path))
        if len(images) == size:
            yield Batch(sources, np.stack(images))
            sources, images = [], []
    if images:
        yield Batch(sources, np.stack(images))
