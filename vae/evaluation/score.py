"""The ``classify`` and ``score`` stages: the VAE's sample quality, as numbers.

``classify`` provides the feature network of :mod:`vae.evaluation.quality` that every score is
measured in. On Fashion-MNIST (``score.feature_net: auto``) that is the network shipped in
``vae/evaluation/feature_nets/``, trained once and fixed, so distances compare across clones,
machines and time (its file's sha256 is checked here, and written beside every score). On any
other data, or with ``score.feature_net: train``, it trains one on the training split; its
distances then compare only with scores measured by the same network (the same sha256).

``score`` compares, in that network's features, sets of ``score.n_samples`` images with as many
test images:

- ``prior_mean`` and ``prior_sample``: decoder means, and images drawn from p(x|z), for z from
  the prior p(z);
- ``gmm_*`` and ``diffusion_*``: the same for z from the densities ``vae generate`` fitted to the
  training codes (:mod:`vae.core.sampler`), at temperature 1; the chosen one's means, and the
  prior's for comparison, also at each of ``score.temperatures`` (``diffusion_mean_t1.2``, ...);
- ``reconstruction``: decoder means at the posterior means of the test images, the floor a
  latent sampler approaches, since it decodes codes like the encoder's;
- ``real_train``: training images, the floor that a perfect model would reach.

The reference is the grey test images, as the prepared data holds them (with
``data.binarize: static``, those are already binarized; the metrics file says which). A dataset
without class labels cannot train the classifier: both stages then write why, and no scores.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from vae.atomic import atomic_write_with
from vae.config import ScoreConfig
from vae.core.model import VAE, embed, eval_mode
from vae.core.sampler import LatentDensity
from vae.data.splits import Split, float_images
from vae.evaluation.quality import (
    ClassifierSettings,
    FeatureNet,
    accuracy,
    quality_report,
    train_classifier,
)

__all__ = [
    "FEATURE_NET_FILE",
    "SHIPPED_SHA256",
    "classify",
    "describe_feature_net",
    "file_sha256",
    "load_feature_net",
    "save_feature_net",
    "score",
    "score_stage",
    "shipped_feature_net",
]

FEATURE_NET_FILE = "feature_net.safetensors"
FORMAT = 2  # 1: models/classifier.pt, a torch pickle of tensors
CHUNK = 1000  # images generated or decoded at once
SHIPPED_DIR = Path(__file__).parent / "feature_nets"
# The shipped networks' files (docs/models.md: how they were trained). A file that differs (a
# bad merge, a Git LFS pointer, an edit) is refused: every published distance was taken in it.
SHIPPED_SHA256 = {
    "fashion_mnist": "32680411ee6074cde86750d403170d6e4f6ca7f0375dcb9399fb85e9cb9b6ead",
}


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_feature_net(dataset: str) -> Path | None:
    """The shipped network's file for ``dataset`` (checked against its sha256), or None."""
    if dataset not in SHIPPED_SHA256:
        return None
    path = SHIPPED_DIR / f"{dataset}.safetensors"
    if not path.is_file() or (sha := file_sha256(path)) != SHIPPED_SHA256[dataset]:
        found = "missing" if not path.is_file() else f"sha256 {sha}"
        raise ValueError(
            f"{path}: {found}, not the shipped feature network (sha256 "
            f"{SHIPPED_SHA256[dataset]}); restore it with `git checkout -- {path.name}`"
        )
    return path


def _unlabelled(split: Split) -> str | None:
    labels = split.labels
    if labels.numel() == 0 or bool((labels < 0).any()):
        return "the dataset has no class labels (a folder without class sub-folders)"
    if labels.unique().numel() < 2:
        return "the training split holds a single class"
    return None


def classify(
    train: Split,
    test: Split,
    cfg: ScoreConfig,
    dataset: str,
    out: Path,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Write the feature network for ``dataset`` to ``out``: the shipped one (its very bytes), or
    one trained on ``train`` (:func:`save_feature_net`). Returns its metrics: which it is
    (``feature_net``: shipped or trained), the file's sha256, its test accuracy on ``test``, the
    seconds taken; without labels and nothing shipped, ``{"skipped": why}`` (a file saying so).
    """
    t0 = time.perf_counter()
    shipped = shipped_feature_net(dataset) if cfg.feature_net == "auto" else None
    if shipped is not None:
        net, _ = load_feature_net(shipped, device)
        if net is None:
            raise ValueError(f"{shipped}: holds no feature network")
        atomic_write_with(out, lambda tmp: shutil.copyfile(shipped, tmp))
        test_accuracy = _test_accuracy(net, test)  # on this test split, not the one it records
    elif why := _unlabelled(train):
        save_feature_net(out, None, {"skipped": why})
        return {"skipped": why}
    else:
        net, info = _train(train, test, cfg, dataset, device)
        save_feature_net(out, net, info)
        test_accuracy = info["test_accuracy"]
    return {
        "feature_net": "trained" if shipped is None else "shipped",
        "sha256": file_sha256(out),
        "test_accuracy": test_accuracy,
        "seconds": time.perf_counter() - t0,
    }


def _test_accuracy(net: FeatureNet, test: Split) -> float | None:
    """The network's accuracy on ``test``; None when the split has no labels."""
    return accuracy(net, test.images, test.labels) if _unlabelled(test) is None else None


def describe_feature_net(metrics: dict[str, Any]) -> str:
    """One line on :func:`classify`'s metrics: which network, its sha256, what compares."""
    if "skipped" in metrics:
        return f"no feature network: {metrics['skipped']}; `vae score` will skip"
    line = (
        f"feature network: {metrics['feature_net']}, sha256 {metrics['sha256'][:12]}, "
        f"test accuracy {metrics['test_accuracy'] or 0.0:.4f}"
    )
    if metrics["feature_net"] == "trained":
        line += "; its distances compare only with scores by this same network (this sha256)"
    return line


def _train(
    train: Split, test: Split, cfg: ScoreConfig, dataset: str, device: torch.device | str
) -> tuple[FeatureNet, dict[str, Any]]:
    """A network trained on ``train``, and what its file records of it."""
    settings = ClassifierSettings(
        epochs=cfg.classifier_epochs,
        batch_size=cfg.classifier_batch_size,
        lr=cfg.classifier_lr,
        num_features=cfg.classifier_features,
        seed=cfg.seed,
    )
    net = train_classifier(train.images, train.labels, settings, device)
    return net, {
        "dataset": dataset,
        "train_images": int(train.images.shape[0]),
        "settings": settings.__dict__,
        "test_accuracy": _test_accuracy(net, test),
        "torch": torch.__version__,
    }


def save_feature_net(path: str | Path, net: FeatureNet | None, info: dict[str, Any]) -> None:
    """Weights as safetensors and ``info`` as one JSON metadata entry (sorted keys), so the
    same network and info give the same bytes, hence the same sha256."""
    from safetensors.torch import save_file

    meta = dict(info, format=FORMAT)
    tensors: dict[str, torch.Tensor] = {}
    if net is not None:
        meta |= {"image_shape": list(net.image_shape), "n_classes": net.head.out_features}
        meta["num_features"] = net.num_features
        tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    blob = {"vae": json.dumps(meta, sort_keys=True)}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=blob))


def load_feature_net(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[FeatureNet | None, dict[str, Any]]:
    """``(net in eval mode, info)`` from :func:`save_feature_net`; ``(None, info)`` for a skip."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("vae", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types)
        raise ValueError(f"{path}: not a feature network file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a feature network of format {FORMAT}")
    shape = {k: meta.pop(k, None) for k in ("format", "image_shape", "n_classes", "num_features")}
    if not state:
        return None, meta
    net = FeatureNet(tuple(shape["image_shape"]), shape["n_classes"], shape["num_features"])
    net.load_state_dict(state)
    return net.to(device).eval(), meta


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


def score_stage(
    model: VAE, models: Path, train: Split, test: Split, binarize: str, cfg: ScoreConfig
) -> dict[str, Any]:
    """:func:`score` with the feature network and samplers of ``models/`` (``vae classify``'s
    and ``vae generate``'s files), and which network and sampler it was."""
    from vae.core.sampler import SAMPLER_FILE, load_sampler

    device = next(model.parameters()).device
    net, info = load_feature_net(models / FEATURE_NET_FILE, device)
    if net is None:
        return {"skipped": info["skipped"]}
    kind, fitted = load_sampler(models / SAMPLER_FILE)
    result = score(model, fitted, kind, net, train, test, binarize, cfg)
    sha = file_sha256(models / FEATURE_NET_FILE)
    return result | {
        "sampler": kind,
        "temperature": fitted[kind].temperature if kind in fitted else 1.0,
        # trained: the distances compare only with scores taken in this same network
        "feature_net": "shipped" if sha in SHIPPED_SHA256.values() else "trained",
        "feature_net_sha256": sha,
        "feature_net_test_accuracy": info.get("test_accuracy"),
    }


def score(
    model: VAE,
    densities: dict[str, LatentDensity],
    chosen: str,
    net: FeatureNet,
    train: Split,
    test: Split,
    binarize: str,
    cfg: ScoreConfig,
) -> dict[str, Any]:
    """Fréchet distance, precision and recall of each set (see the module docstring).

    ``densities`` are the fitted samplers by kind, ``chosen`` the one ``generate.sampler`` picked
    (its means are also scored at ``cfg.temperatures``). ``cfg.seed`` picks the images and draws
    the samples, and binarizes the test images that are reconstructed (dynamic binarization).
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
            for name, sampler in {"prior": None, **densities}.items():
                model.latent_sampler = sampler
                temps = cfg.temperatures if name in (chosen, "prior") else ()
                sets |= _sampled_sets(model, name, n, cfg.seed, temps)
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


class _PriorAt:
    """p(z) at a temperature, as a latent sampler (for scoring only; never registered)."""

    def __init__(self, model: VAE) -> None:
        self.model, self.temperature = model, 1.0

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model.prior().sample(n, generator, device, self.temperature)


def _sampled_sets(
    model: VAE, name: str, n: int, seed: int, temperatures: tuple[float, ...]
) -> dict[str, torch.Tensor]:
    """``{name}_mean`` and ``{name}_sample`` at temperature 1, ``{name}_mean_t{t}`` at each t."""
    density = model.latent_sampler
    if density is None and temperatures:
        model.latent_sampler = density = _PriorAt(model)  # type: ignore[assignment]
    kept = 1.0 if density is None else density.temperature
    out = {}
    try:
        for t in (1.0, *temperatures):
            if density is not None:
                density.temperature = t
            if t == 1.0:
                out[f"{name}_mean"] = _samples(model, n, seed, mean=True)
                out[f"{name}_sample"] = _samples(model, n, seed, mean=False)
            else:
                out[f"{name}_mean_t{t:g}"] = _samples(model, n, seed, mean=True)
    finally:
        if density is not None:
            density.temperature = kept
    return out
