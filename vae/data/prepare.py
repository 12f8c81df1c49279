"""``vae prepare``: the seeded train/val/test splits, from the ingested raw data.

``prepare`` reads ``data/raw`` (:mod:`vae.data.raw`) and writes ``{train,val,test}.pt`` (a dict of
uint8 images (N, C, H, W) and int64 labels (N,), loadable with ``weights_only=True``) and
``manifest.json`` (counts, shapes and the sha256 of each raw file's content; for IDX files the
decompressed content, so a copy that is gzipped or not hashes the same). Training reads the
splits through :mod:`vae.data.splits`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from vae.atomic import atomic_torch_save, atomic_write_json
from vae.config import DataConfig
from vae.data.raw import read_source
from vae.data.splits import DataError, Split

__all__ = ["binarize_uint8", "prepare"]

log = logging.getLogger(__name__)


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


def _split_by_content(
    images: Split, digests: list[str], fraction: float, seed: int
) -> tuple[Split, Split, Split]:
    """A folder's train, val and test splits, each image's split decided by its content's hash.

    A folder grows between retraining runs. A seeded permutation would reshuffle every split
    when one image is added, so the champion's re-score on the new test split would include
    images it was trained on. Here an image's split depends only on its bytes (and the seed):
    it never moves, and identical images always share a split. Test holds ~``fraction`` of the
    images and val ~``fraction`` of the rest, as for the IDX datasets.
    """

    def uniform(salt: str) -> torch.Tensor:  # one number in [0, 1) per image
        hexes = (hashlib.sha256(f"{seed}:{salt}:{d}".encode()).hexdigest() for d in digests)
        return torch.tensor([int(h[:13], 16) / 16**13 for h in hexes], dtype=torch.float64)

    test = uniform("test") < fraction
    val = ~test & (uniform("val") < fraction)
    masks = {"train": ~test & ~val, "val": val, "test": test}
    for name, mask in masks.items():
        if not bool(mask.any()):
            raise DataError(
                f"data.val_fraction: {fraction} leaves no {name} images among {len(images)}; "
                "add images or change it"
            )
    train, val_split, test_split = (
        Split(images.images[m], images.labels[m]) for m in masks.values()
    )
    return train, val_split, test_split


def prepare(
    cfg: DataConfig,
    out_dir: Path,
    raw_dir: Path = Path("data/raw"),
    strict: bool = False,
) -> dict[str, Any]:
    """Read the ingested raw data, hold out validation, write the splits; return the manifest.

    If ``out_dir`` already holds a manifest whose raw-file sha256 differ from the files read
    now, the changed files are named in a warning, or, with ``strict``, in a :class:`DataError`
    before anything is written.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    raw = read_source(cfg.dataset, raw_dir, cfg.max_image_pixels)
    if cfg.dataset == "folder":
        digests = list(raw.sha256.values())  # in the order of the images
        train, val, test = _split_by_content(raw.splits["all"], digests, cfg.val_fraction, cfg.seed)
    else:  # the IDX test set is given; val is a seeded draw from the training set
        train, val = _split_off(raw.splits["train"], cfg.val_fraction, gen)
        test = raw.splits["test"]
    splits = {"train": train, "val": val, "test": test}
    if cfg.binarize == "static":  # sampled once, with the data seed; later reads are fixed
        splits = {k: Split(binarize_uint8(s.images, gen), s.labels) for k, s in splits.items()}
    hashes = raw.sha256
    manifest = {
        "dataset": cfg.dataset,
        "binarize": cfg.binarize,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "classes": raw.classes,
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
        raw_dir,
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
