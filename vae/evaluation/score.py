"""The ``classify`` and ``score`` stages: the VAE's sample quality, as numbers.

``classify`` trains the feature network of :mod:`vae.evaluation.quality` on the training split, once
(DVC caches it; it depends on the data and ``score.classifier_*`` only, not on the VAE). ``score``
compares, in that network's features, sets of ``score.n_samples`` images with as many test
images:

- ``prior_mean`` and ``prior_sample``: decoder means, and images drawn from p(x|z), for z from
  the prior p(z);
- ``gmm_mean`` and ``gmm_sample``: the same for z from the mixture ``vae generate`` fitted to the
  training codes (:mod:`vae.core.sampler`);
- ``reconstruction``: decoder means at the posterior means of the test images;
- ``real_train``: training images, the floor that a perfect model would reach.

The reference is the grey test images, as the prepared data holds them (with
``data.binarize: static``, those are already binarized; the metrics file says which). A dataset
without class labels cannot train the classifier: both stages then write why, and no scores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from vae.atomic import atomic_torch_save
from vae.config import ScoreConfig
from vae.core.model import VAE, embed, eval_mode
from vae.core.sampler import GaussianMixture
from vae.data.splits import Split, float_images
from vae.evaluation.quality import (
    ClassifierSettings,
    FeatureNet,
    accuracy,
    quality_report,
    train_classifier,
)

__all__ = ["classify", "load_classifier", "save_classifier", "score"]

CLASSIFIER_FORMAT = 1
CHUNK = 1000  # images generated or decoded at once


def _unlabelled(split: Split) -> str | None:
    labels = split.labels
    if labels.numel() == 0 or bool((labels < 0).any()):
        return "the dataset has no class labels (a folder without class sub-folders)"
    if labels.unique().numel() < 2:
        return "the training split holds a single class"
    return None


def classify(
    train: Split, test: Split, cfg: ScoreConfig, device: torch.device | str = "cpu"
) -> tuple[FeatureNet | None, dict[str, Any]]:
    """Train the feature classifier on ``train``; returns it and its metrics (test accuracy).

    Without labels it returns ``(None, {"skipped": why})`` and trains nothing.
    """
    if why := _unlabelled(train):
        return None, {"skipped": why}
    settings = ClassifierSettings(
        epochs=cfg.classifier_epochs,
        batch_size=cfg.classifier_batch_size,
        lr=cfg.classifier_lr,
        num_features=cfg.classifier_features,
        seed=cfg.seed,
    )
    t0 = time.perf_counter()
    net = train_classifier(train.images, train.labels, settings, device)
    seconds = time.perf_counter() - t0
    labelled = _unlabelled(test) is None
    return net, {
        "test_accuracy": accuracy(net, test.images, test.labels) if labelled else None,
        "train_images": int(train.images.shape[0]),
        "epochs": cfg.classifier_epochs,
        "seconds": seconds,
    }


def save_classifier(path: str | Path, net: FeatureNet | None, metrics: dict[str, Any]) -> None:
    """Tensors and plain values only, so it loads with ``weights_only=True``."""
    blob: dict[str, Any] = {"format": CLASSIFIER_FORMAT, "metrics": metrics}
    if net is not None:
        blob.update(
            image_shape=list(net.image_shape),
            n_classes=net.head.out_features,
            num_features=net.num_features,
            state=net.state_dict(),
        )
    atomic_torch_save(path, blob)


def load_classifier(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[FeatureNet | None, dict[str, Any]]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not a feature classifier of format {CLASSIFIER_FORMAT}")
    if "state" not in blob:
        return None, blob["metrics"]
    net = FeatureNet(tuple(blob["image_shape"]), blob["n_classes"], blob["num_features"])
    net.load_state_dict(blob["state"])
    return net.to(device).eval(), blob["metrics"]


@torch.no_grad()
def _samples(model: VAE, n: int, seed: int, mean: bool) -> torch.Tensor:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    parts = [model.generate(min(CHUNK, n - i), gen, mean=mean) for i in range(0, n, CHUNK)]
    return torch.cat(parts).float().cpu()


@torch.no_grad()
def _reconstructions(model: VAE, x: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    mu, _ = embed(model, x, CHUNK)
    parts = [model.decode(m.to(device)).mean.float().cpu() for m in mu.split(CHUNK)]
    return torch.cat(parts)


def score(
    model: VAE,
    gmm: GaussianMixture | None,
    net: FeatureNet,
    train: Split,
    test: Split,
    binarize: str,
    cfg: ScoreConfig,
) -> dict[str, Any]:
    """Fréchet distance, precision and recall of each set (see the module docstring).

    ``cfg.seed`` picks the images and draws the samples, and binarizes the test images that are
    reconstructed (dynamic binarization).
    """
    n = min(cfg.n_samples, test.images.shape[0], train.images.shape[0])
    pick = torch.Generator().manual_seed(cfg.seed)
    t_idx = torch.randperm(test.images.shape[0], generator=pick)[:n]
    r_idx = torch.randperm(train.images.shape[0], generator=pick)[:n]
    real = test.images[t_idx].float() / 255.0
    sets = {"real_train": train.images[r_idx].float() / 255.0}
    kept = model.latent_sampler
    try:
        with eval_mode(model):
            samplers = {"prior": None} if gmm is None else {"prior": None, "gmm": gmm}
            for name, sampler in samplers.items():
                model.latent_sampler = sampler
                sets[f"{name}_mean"] = _samples(model, n, cfg.seed, mean=True)
                sets[f"{name}_sample"] = _samples(model, n, cfg.seed, mean=False)
            test_in = Split(test.images[t_idx], test.labels[t_idx])
            sets["reconstruction"] = _reconstructions(
                model, float_images(test_in, binarize, cfg.seed)
            )
    finally:
        model.latent_sampler = kept
    t0 = time.perf_counter()
    report = quality_report(net, real, sets, k=cfg.neighbours)
    return {
        "reference": "binarized test images" if binarize == "static" else "grey test images",
        "n": n,
        "neighbours": cfg.neighbours,
        "sets": report,
        "seconds": time.perf_counter() - t0,
    }
