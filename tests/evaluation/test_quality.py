"""vae.evaluation.quality: the Fréchet distance and precision/recall against closed forms and
boundary cases, and the feature classifier on tiny synthetic data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vae.evaluation.quality import (
    ClassifierSettings,
    FeatureNet,
    accuracy,
    features,
    frechet_distance,
    frechet_from_moments,
    precision_recall,
    quality_report,
    train_classifier,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return q


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def test_identical_sets_have_zero_distance_and_full_precision_recall() -> None:
    f = torch.randn(500, 8, generator=_gen(), dtype=torch.float64) * 3.0 + 1.0
    assert abs(frechet_distance(f, f.clone())) < 1e-6 * 9.0 * 8  # relative to Tr(cov) ~ 72
    assert precision_recall(f, f.clone(), k=3) == (1.0, 1.0)


def test_frechet_of_sampled_diagonal_gaussians_matches_closed_form() -> None:
    mu1, mu2 = torch.zeros(4), torch.tensor([1.0, 0.0, 0.0, 0.5])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([4.0, 1.0, 0.5, 0.25])
    n = 20_000
    a = mu1 + s1.sqrt() * torch.randn(n, 4, generator=_gen(1), dtype=torch.float64)
    b = mu2 + s2.sqrt() * torch.randn(n, 4, generator=_gen(2), dtype=torch.float64)
    exact = float((mu1 - mu2).square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())  # 2.67
    # sampling error: the mean term alone has std ~ 2 sqrt(sum dmu^2 (s1 + s2) / n) ~ 0.03
    assert frechet_distance(a, b) == pytest.approx(exact, abs=0.1)


def test_frechet_from_moments_with_commuting_covariances() -> None:
    # S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T commute, so (S1 S2)^(1/2) = Q diag(sqrt(ab)) Q^T
    d = 6
    q = _rotation(d, 3)
    ea = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0, 9.0], dtype=torch.float64)
    eb = torch.tensor([4.0, 0.5, 0.01, 1.0, 3.0, 1.0], dtype=torch.float64)
    cov1, cov2 = q @ torch.diag(ea) @ q.T, q @ torch.diag(eb) @ q.T
    mu1 = torch.arange(d, dtype=torch.float64)
    mu2 = mu1 + 0.5
    exact = d * 0.25 + float((ea + eb - 2 * (ea * eb).sqrt()).sum())
    assert frechet_from_moments(mu1, cov1, mu2, cov2) == pytest.approx(exact, rel=1e-9)
    assert frechet_from_moments(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_from_moments_with_non_commuting_covariances_matches_scipy_sqrtm() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    d = 5
    x = torch.randn(d, d, generator=_gen(4), dtype=torch.float64)
    y = torch.randn(d, d, generator=_gen(5), dtype=torch.float64)
    cov1, cov2 = x @ x.T + 0.1 * torch.eye(d), y @ y.T + 0.1 * torch.eye(d)
    root = linalg.sqrtm((cov1 @ cov2).numpy()).real
    exact = float(torch.trace(cov1 + cov2)) - 2 * float(root.trace())
    mu = torch.zeros(d, dtype=torch.float64)
    assert frechet_from_moments(mu, cov1, mu, cov2) == pytest.approx(exact, rel=1e-9)


class _Identity(nn.Module):
    """Feature vectors pass through as their own "features" (torchmetrics' custom extractor)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_frechet_distance_agrees_with_torchmetrics_public_metric() -> None:
    # Our formula against the FID metric most papers' code now reports (torchmetrics, dev extra).
    fid = pytest.importorskip("torchmetrics.image.fid")

    a = torch.randn(300, 5, generator=_gen(6), dtype=torch.float64)
    b = torch.randn(200, 5, generator=_gen(7), dtype=torch.float64) * 1.5 + 0.3
    metric = fid.FrechetInceptionDistance(feature=_Identity(5))
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert frechet_distance(a, b) == pytest.approx(float(metric.compute()), rel=1e-9)


def test_frechet_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="must agree"):
        frechet_from_moments(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2))


# ---------------------------------------------------------------------------------------------
# Precision and recall


def _clusters(centres: torch.Tensor, per: int, seed: int) -> torch.Tensor:
    """``per`` points N(centre, 0.1^2 I) around each centre (K, F) -> (K * per, F)."""
    noise = 0.1 * torch.randn(centres.shape[0], per, centres.shape[1], generator=_gen(seed))
    return (centres[:, None] + noise).reshape(-1, centres.shape[1]).double()


def test_far_apart_sets_have_zero_precision_and_recall() -> None:
    real = _clusters(torch.zeros(1, 3), 100, 8)
    fake = _clusters(torch.full((1, 3), 100.0), 100, 9)
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_fake_covering_half_the_modes_has_full_precision_and_half_recall() -> None:
    modes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    real = _clusters(modes, 200, 10)
    fake = _clusters(modes[:2], 200, 11)
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.95
    assert recall == pytest.approx(0.5, abs=0.03)
    # chunking changes memory, not the answer
    assert precision_recall(real, fake, k=3, chunk=37) == (precision, recall)


def test_precision_recall_needs_more_than_k_points() -> None:
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2), k=3)


# ---------------------------------------------------------------------------------------------
# The feature classifier


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_feature_net_shapes(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    net = FeatureNet(shape, n_classes=10, num_features=16).eval()
    x = torch.rand(2, *shape)
    assert net(x).shape == (2, 10)
    f = net.features(x)
    assert f.shape == (2, 16) and f.dtype == torch.float32
    assert features(net, x, batch_size=1).shape == (2, 16)
    assert features(net, x).dtype == torch.float64


def test_feature_net_rejects_bad_image_shapes() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        FeatureNet((1, 30, 28), n_classes=10)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        FeatureNet((2, 28, 28), n_classes=10)


def _halves(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: the left half is bright; class 1: the right half. uint8 (n, 1, 8, 8), noisy."""
    labels = torch.arange(n) % 2
    x = torch.rand(n, 1, 8, 8, generator=_gen(seed)) * 0.3
    x[labels == 0, :, :, :4] += 0.6
    x[labels == 1, :, :, 4:] += 0.6
    return (x * 255).to(torch.uint8), labels


def test_train_classifier_learns_and_is_deterministic() -> None:
    images, labels = _halves()
    cfg = ClassifierSettings(epochs=2, batch_size=32, lr=3e-3, num_features=8, seed=3)
    rng = torch.get_rng_state()
    net = train_classifier(images, labels, cfg)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    assert not net.training
    assert all(v.is_contiguous() for v in net.state_dict().values())  # safetensors can save it
    assert accuracy(net, images, labels, batch_size=64) == 1.0
    again = train_classifier(images, labels, cfg).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in net.state_dict().items())


def test_train_classifier_rejects_unlabelled_images() -> None:
    images, labels = _halves(8)
    labels[0] = -1
    with pytest.raises(ValueError, match="unlabelled"):
        train_classifier(images, labels, ClassifierSettings(epochs=1))


def test_quality_report_scores_each_set() -> None:
    torch.manual_seed(0)
    net = FeatureNet((1, 8, 8), n_classes=2, num_features=8)
    real = torch.rand(40, 1, 8, 8, generator=_gen(1))
    sets = {"same": real.clone(), "noise": torch.rand(30, 1, 8, 8, generator=_gen(2))}
    report = quality_report(net, real, sets, k=3, batch_size=16)
    assert set(report) == {"same", "noise"}
    for name, row in report.items():
        assert set(row) == {"fid", "precision", "recall", "n"}
        assert row["n"] == sets[name].shape[0]
        assert all(math.isfinite(v) for v in row.values())
    assert report["same"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert report["same"]["precision"] == report["same"]["recall"] == 1.0
