"""Sample quality offline: Fréchet distance and precision/recall in a classifier's features.

FID (Heusel et al. 2017) compares Gaussians fitted to Inception-v3 features. Inception weights
are not available offline, and a network trained on 299x299 colour photographs says little about
28x28 grey clothes. So, as is common for MNIST-like data, the features here are the penultimate
activations of a small CNN classifier trained on the training split (:class:`FeatureNet`). The
numbers are comparable between models judged by the *same* classifier (same data, settings and
seed), never with published Inception FIDs.

Precision and recall (Kynkäänniemi et al. 2019, "Improved precision and recall metric for
assessing generative models") split what one Fréchet distance mixes: precision is the fraction
of samples that look like real images (fidelity), recall the fraction of real images the samples
come close to (diversity). A blurry VAE mostly loses precision; a collapsed one loses recall.

Features come back as (N, F) float64 on the CPU; moments and distances are float64 too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vae.core.model import eval_mode

__all__ = [
    "ClassifierSettings",
    "FeatureNet",
    "accuracy",
    "features",
    "frechet_distance",
    "frechet_from_moments",
    "precision_recall",
    "quality_report",
    "train_classifier",
]


@dataclass(frozen=True)
class ClassifierSettings:
    """How the feature classifier is trained.

    On Fashion-MNIST (54k training images, two CPU cores, ~26 s an epoch when they are idle)
    five epochs reached 0.919 test accuracy and three 0.911.
    """

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    num_features: int = 128
    seed: int = 0


class FeatureNet(nn.Module):
    """A small CNN classifier whose penultimate layer (``features``) embeds images for FID.

    (B, C, H, W) in [0, 1] -> conv3x3(32) -> pool -> BN -> ReLU -> conv3x3(64) -> pool -> BN
    -> ReLU -> linear(num_features) -> ReLU -> dropout -> linear(n_classes). Batch norm comes
    after pooling, on a quarter of the pixels: on the CPU, BN at full resolution dominated a
    training step (390 ms against 65 ms for a batch of 128 on two cores).
    """

    def __init__(
        self, image_shape: tuple[int, int, int], n_classes: int, num_features: int = 128
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        if c not in (1, 3) or h % 4 or w % 4:
            raise ValueError(
                f"FeatureNet: needs 1 or 3 channels and height and width divisible by 4, "
                f"got {tuple(image_shape)}"
            )
        if n_classes < 2:
            raise ValueError(f"FeatureNet: needs at least 2 classes, got {n_classes}")
        self.image_shape = tuple(image_shape)
        self.num_features = num_features  # the width of features()
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * (h // 4) * (w // 4), num_features),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(num_features, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, num_features) float32 penultimate activations."""
        return self.body(x - 0.5).float()  # centred, as no norm comes before the first conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, n_classes) logits."""
        return self.head(self.dropout(self.features(x)))


def _check_labelled(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"expected {images.shape[0]} labels, got shape {tuple(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("the feature classifier needs labels; some images are unlabelled (-1)")


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: ClassifierSettings,
    device: torch.device | str = "cpu",
) -> FeatureNet:
    """Train a :class:`FeatureNet` on uint8 images (N, C, H, W) and int64 labels (N,).

    Seeded: ``cfg.seed`` fixes the initial weights and dropout (through the global RNG, forked
    so the caller's random stream is left as it was) and the batch order (its own generator),
    so the same data and settings give the same weights, hence comparable scores, on the CPU.
    Returns the network in eval mode.
    """
    _check_labelled(images, labels)
    n_classes = max(2, int(labels.max()) + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = FeatureNet(tuple(images.shape[1:]), n_classes, cfg.num_features).to(device)
        # Channels-last weights made a CPU training step 1.7x faster (oneDNN); the returned
        # weights are contiguous again, so they save with safetensors.
        net.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        net.train()
        for _ in range(cfg.epochs):
            for idx in torch.randperm(images.shape[0], generator=gen).split(cfg.batch_size):
                x = images[idx].to(device).float().div_(255.0)  # (B, C, H, W)
                loss = F.cross_entropy(net(x), labels[idx].to(device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"feature classifier: loss is {loss.item()}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return net.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def accuracy(
    net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """Fraction of uint8 images (N, C, H, W) that ``net`` classifies as ``labels`` (N,)."""
    _check_labelled(images, labels)
    device = next(net.parameters()).device
    correct = 0
    with eval_mode(net):
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(device).float().div_(255.0)
            pred = net(x).argmax(-1).cpu()
            correct += int((pred == labels[i : i + batch_size].cpu()).sum())
    return correct / max(1, images.shape[0])


@torch.no_grad()
def features(net: FeatureNet, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Float images (N, C, H, W) in [0, 1] -> (N, F) float64 features on the CPU.

    Batches go to the network's device one at a time, so ``images`` may stay on the CPU. On
    the CPU a batch of 256 ran faster than 1000 (about 2.7 s against 3.8 s per 10k images).
    """
    if images.dtype == torch.uint8:
        raise ValueError("features: expected float images in [0, 1], got uint8 (divide by 255)")
    device = next(net.parameters()).device
    out = [torch.empty(0, net.num_features, dtype=torch.float64)]
    with eval_mode(net):
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(device, torch.float32)
            out.append(net.features(x).double().cpu())  # (B, F)
    return torch.cat(out)


def frechet_from_moments(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)), in float64.

    cov1 cov2 is similar to the symmetric cov1^(1/2) cov2 cov1^(1/2), so its eigenvalues are real
    and non-negative, and the trace of its square root is the sum of their square roots. Rounding
    can leave one slightly negative or complex; the real part of its complex square root drops
    what the rounding added. This is the computation, term by term, of torchmetrics' FID
    (``FrechetInceptionDistance``), which tests/evaluation/test_quality.py checks it against,
    without the 4 s its import costs every ``vae score``.
    """
    d = mu1.shape[-1]
    if mu2.shape != (d,) or mu1.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"frechet: means (F,) and covariances (F, F) must agree, got {tuple(mu1.shape)}, "
            f"{tuple(cov1.shape)}, {tuple(mu2.shape)}, {tuple(cov2.shape)}"
        )
    m1, c1, m2, c2 = (t.detach().to("cpu", torch.float64) for t in (mu1, cov1, mu2, cov2))
    root_trace = torch.linalg.eigvals(c1 @ c2).sqrt().real.sum()
    return float((m1 - m2).square().sum() + (c1.trace() + c2.trace()) - 2 * root_trace)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F)."""
    for name, f in (("feats_a", feats_a), ("feats_b", feats_b)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"frechet_distance: {name} needs shape (N >= 2, F), got {f.shape}")
    a, b = feats_a.detach().cpu().double(), feats_b.detach().cpu().double()
    return frechet_from_moments(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(N, F) -> (N,) distance from each point to its k-th nearest other point in x."""
    radii = []
    for rows in x.split(chunk):
        d = torch.cdist(rows, x)  # (c, N); each row holds the point itself at distance 0
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1000
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of features (N, F) and (M, F).

    Each set's manifold is the union of balls around its points, each with the radius to the
    point's k-th nearest neighbour in its own set. Precision is the fraction of ``fake`` inside
    the real manifold, recall the fraction of ``real`` inside the fake one. Distances come
    ``chunk`` rows at a time, so memory is O(chunk * max(N, M)): 80 MB for chunk 1000 and
    N = M = 10 000, instead of 800 MB for the whole matrix.
    """
    n, m = real.shape[0], fake.shape[0]
    if min(n, m) <= k:
        raise ValueError(f"precision_recall: each set needs more than k={k} points, got {n}, {m}")
    real, fake = real.detach().cpu().double(), fake.detach().cpu().double()
    r_real, r_fake = _knn_radii(real, k, chunk), _knn_radii(fake, k, chunk)  # (N,), (M,)
    fake_inside = []
    real_covered = torch.zeros(n, dtype=torch.bool)
    for rows, radii in zip(fake.split(chunk), r_fake.split(chunk), strict=True):
        d = torch.cdist(rows, real)  # (c, N)
        fake_inside.append((d <= r_real).any(1))  # in some real point's ball
        real_covered |= (d <= radii[:, None]).any(0)  # in some fake point's ball
    precision = torch.cat(fake_inside).double().mean().item()
    return precision, real_covered.double().mean().item()


def quality_report(
    net: FeatureNet,
    real: torch.Tensor,
    sets: dict[str, torch.Tensor],
    k: int = 3,
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """Score named sets of float images (N, C, H, W) in [0, 1] against ``real`` images.

    Returns ``{name: {"fid", "precision", "recall", "n"}}``; the real features are computed
    once. ``fid`` is the Fréchet distance in ``net``'s features, not Inception's.
    """
    f_real = features(net, real, batch_size)
    report = {}
    for name, images in sets.items():
        f = features(net, images, batch_size)
        precision, recall = precision_recall(f_real, f, k)
        report[name] = {
            "fid": frechet_distance(f_real, f),
            "precision": precision,
            "recall": recall,
            "n": images.shape[0],
        }
    return report
