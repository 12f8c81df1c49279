"""The distributions and the loss against closed forms and torch.distributions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import distributions as D

from tests.conftest import mlp_config
from vae.core.distributions import (
    BernoulliLikelihood,
    DiagonalGaussian,
    GaussianLikelihood,
    standard_normal_log_prob,
)
from vae.core.losses import iwae_bound, kl_weight, negative_elbo, objective_terms
from vae.core.model import VAE
from vae.training.train import lr_at


def _posterior(seed: int = 0, b: int = 5, d: int = 3) -> DiagonalGaussian:
    g = torch.Generator().manual_seed(seed)
    return DiagonalGaussian(torch.randn(b, d, generator=g), torch.randn(b, d, generator=g))


def test_kl_matches_torch_distributions() -> None:
    q = _posterior()
    ref = D.kl_divergence(D.Normal(q.mean, q.std), D.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(q.kl(), ref)


def test_kl_closed_form_values() -> None:
    # KL(N(0,1) || N(0,1)) = 0; KL(N(m, 1) || N(0, 1)) = m^2 / 2; KL(N(0, s^2)||N(0,1)) known.
    zero = DiagonalGaussian(torch.zeros(1, 2), torch.zeros(1, 2))
    assert zero.kl().item() == pytest.approx(0.0, abs=1e-7)
    shifted = DiagonalGaussian(torch.tensor([[3.0]]), torch.zeros(1, 1))
    assert shifted.kl().item() == pytest.approx(4.5)
    s2 = 0.25
    narrow = DiagonalGaussian(torch.zeros(1, 1), torch.full((1, 1), math.log(s2)))
    assert narrow.kl().item() == pytest.approx(0.5 * (s2 - 1 - math.log(s2)))


def test_kl_matches_monte_carlo() -> None:
    q = _posterior(seed=1, b=2, d=2)
    z = q.sample(torch.Generator().manual_seed(0), n=200_000)  # (n, B, D)
    prior = D.Normal(0.0, 1.0)
    mc = (q.log_prob(z) - prior.log_prob(z).sum(-1)).mean(0)
    torch.testing.assert_close(mc, q.kl(), rtol=0.02, atol=0.02)


def test_posterior_sampling_is_seeded_and_reparameterised() -> None:
    q = _posterior()
    a = q.sample(torch.Generator().manual_seed(5))
    b = q.sample(torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    mean = q.mean.clone().requires_grad_(True)
    DiagonalGaussian(mean, q.logvar).sample(torch.Generator().manual_seed(0)).sum().backward()
    assert mean.grad is not None and torch.allclose(mean.grad, torch.ones_like(mean))
    assert torch.equal(q.mode(), q.mean)
    torch.testing.assert_close(q.log_prob(a), D.Normal(q.mean, q.std).log_prob(a).sum(-1))


def test_bernoulli_likelihood_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 5, 5, generator=g)
    x = torch.bernoulli(torch.full((4, 1, 5, 5), 0.5), generator=g)
    ref = D.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(-1)
    torch.testing.assert_close(BernoulliLikelihood(logits).log_prob(x), ref)
    torch.testing.assert_close(BernoulliLikelihood(logits).mean, torch.sigmoid(logits))


@pytest.mark.parametrize("shared", [False, True])
def test_gaussian_likelihood_matches_torch(shared: bool) -> None:
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(3, 1, 4, 4, generator=g)
    logvar = torch.full((1, 1, 1), -2.0) if shared else torch.randn(1, 4, 4, generator=g) - 2
    x = torch.rand(3, 1, 4, 4, generator=g)
    ref = D.Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).flatten(1).sum(-1)
    torch.testing.assert_close(GaussianLikelihood(mean, logvar).log_prob(x), ref)


def test_kl_warmup_schedule_boundaries() -> None:
    assert kl_weight(0, 100) == 0.0
    assert kl_weight(50, 100) == pytest.approx(0.5)
    assert kl_weight(100, 100) == 1.0
    assert kl_weight(10_000, 100) == 1.0
    assert kl_weight(0, 0) == 1.0  # warm-up off
    assert kl_weight(25, 100, beta=4.0) == pytest.approx(1.0)


def _tiny_model(**overrides: object) -> VAE:
    torch.manual_seed(0)
    cfg = mlp_config(latent_dim=3, hidden_dim=16, **overrides)  # type: ignore[arg-type]
    return VAE(cfg, (1, 6, 6))


def test_lr_schedule_boundaries_and_closed_form() -> None:
    lr, total = 3e-3, 1000
    assert [lr_at(s, total, lr, 0.0) for s in (0, 500, 999, 5000)] == [lr] * 4  # constant
    # decay 0.2: constant over steps 0..800, then lr * (1 + cos(pi * (s - 800) / 200)) / 2
    assert lr_at(0, total, lr, 0.2) == lr and lr_at(800, total, lr, 0.2) == lr
    assert lr_at(900, total, lr, 0.2) == pytest.approx(lr / 2)
    assert lr_at(850, total, lr, 0.2) == pytest.approx(lr * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(1000, total, lr, 0.2) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(2000, total, lr, 0.2) == pytest.approx(0.0, abs=1e-15)  # never negative
    # decay 1: the plain cosine schedule from the first step
    for s in (0, 250, 500, 999):
        assert lr_at(s, total, lr, 1.0) == pytest.approx(
            lr * (1 + math.cos(math.pi * s / total)) / 2
        )
    rates = [lr_at(s, total, lr, 0.3) for s in range(total + 1)]
    assert all(a >= b for a, b in itertools.pairwise(rates))  # never rises


def test_loss_reduction_rule_sum_pixels_mean_batch() -> None:
    model = _tiny_model()
    x = torch.bernoulli(torch.full((7, 1, 6, 6), 0.3), generator=torch.Generator().manual_seed(1))
    out = model(x, torch.Generator().manual_seed(2))
    terms = negative_elbo(x, out)
    recon = (
        torch.nn.functional.binary_cross_entropy_with_logits(
            out.likelihood.logits, x, reduction="sum"
        )
        / x.shape[0]
    )
    kl = out.posterior.kl().sum() / x.shape[0]
    torch.testing.assert_close(terms.recon, recon)
    torch.testing.assert_close(terms.kl, kl)
    torch.testing.assert_close(terms.elbo, -(recon + kl))
    torch.testing.assert_close(terms.loss, recon + kl)
    half = negative_elbo(x, out, kl_weight=0.5)
    torch.testing.assert_close(half.loss, recon + 0.5 * kl)
    torch.testing.assert_close(half.elbo, terms.elbo)  # the ELBO itself is never weighted


def test_free_bits_floor_each_dimension() -> None:
    model = _tiny_model()
    x = torch.rand(4, 1, 6, 6)
    out = model(x, torch.Generator().manual_seed(0))
    lam = 10.0  # above every dimension's KL here, so the KL term is exactly D * lam
    terms = negative_elbo(x, out, free_bits=lam)
    torch.testing.assert_close(terms.loss, terms.recon + 3 * lam)
    assert terms.kl < 3 * lam  # the reported KL is the true one


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"arch": "conv", "conv_channels": 4},
        {"likelihood": "gaussian"},
        {"likelihood": "gaussian", "gaussian_variance": "shared"},
        {"activation": "relu"},
        {"activation": "silu", "arch": "conv", "conv_channels": 4},
    ],
)
def test_model_shapes_and_generation(overrides: dict) -> None:
    torch.manual_seed(0)
    model = VAE(mlp_config(latent_dim=3, hidden_dim=16, **overrides), (1, 8, 8))
    x = torch.rand(5, 1, 8, 8)
    out = model(x, torch.Generator().manual_seed(0))
    assert out.posterior.mean.shape == (5, 3) and out.z.shape == (5, 3)
    assert out.likelihood.mean.shape == (5, 1, 8, 8)
    assert model.decode(torch.zeros(2, 5, 3)).mean.shape == (2, 5, 1, 8, 8)
    mean = model.generate(6, torch.Generator().manual_seed(1), mean=True)
    sample = model.generate(6, torch.Generator().manual_seed(1), mean=False)
    assert mean.shape == sample.shape == (6, 1, 8, 8)
    assert not torch.equal(mean, sample)
    again = model.generate(6, torch.Generator().manual_seed(1), mean=False)
    assert torch.equal(sample, again)


def _tiny_model_and_batch() -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    model = VAE(mlp_config(latent_dim=3, hidden_dim=8), (1, 4, 4))
    x = torch.bernoulli(torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(1)))
    return model, x


def test_iwae_with_one_sample_is_the_monte_carlo_elbo_of_that_sample() -> None:
    model, x = _tiny_model_and_batch()
    eps = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(2))
    terms = iwae_bound(x, model(x, eps=eps))
    q = model.encode(x)
    z = q.mean + q.std * eps[0]
    by_hand = model.decode(z).log_prob(x) + standard_normal_log_prob(z) - q.log_prob(z)
    torch.testing.assert_close(-terms.loss, by_hand.mean())
    torch.testing.assert_close(terms.elbo, by_hand.mean())


def test_iwae_warm_up_anneals_the_weights_and_ends_at_the_bound() -> None:
    model, x = _tiny_model_and_batch()
    eps = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(4))
    out = model(x, eps=eps)
    q = model.encode(x)
    z = q.mean + q.std * eps  # (K, B, D)
    log_px_z = model.decode(z).log_prob(x)
    log_ratio = standard_normal_log_prob(z) - q.log_prob(z)
    for w in (0.0, 0.3):
        annealed = torch.logsumexp(log_px_z + w * log_ratio, 0) - math.log(4)
        terms = iwae_bound(x, out, kl_weight=w)
        torch.testing.assert_close(-terms.loss, annealed.mean())
        torch.testing.assert_close(terms.elbo, (log_px_z + log_ratio).mean())  # unweighted
    torch.testing.assert_close(iwae_bound(x, out, kl_weight=1.0).loss, iwae_bound(x, out).loss)
    # the training step's dispatcher passes the warm-up weight on
    torch.testing.assert_close(
        objective_terms(x, out, "iwae", 0.3).loss, iwae_bound(x, out, 0.3).loss
    )
    # with one sample, the annealed bound is the one-sample ELBO with its KL term weighted
    one = iwae_bound(x, model(x, eps=eps[:1]), kl_weight=0.3)
    torch.testing.assert_close(-one.loss, (log_px_z[0] + 0.3 * log_ratio[0]).mean())


def test_iwae_bound_is_the_log_mean_weight_and_tightens_the_elbo() -> None:
    model, x = _tiny_model_and_batch()
    eps = torch.randn(50, 5, 3, generator=torch.Generator().manual_seed(3))
    out = model(x, eps=eps)
    terms = iwae_bound(x, out)
    log_w = torch.stack([iwae_bound(x, model(x, eps=e[None])).loss.neg() for e in eps])
    # per-sample means: the k=1 bounds average to the Monte Carlo ELBO of the same 50 samples
    torch.testing.assert_close(log_w.mean(), terms.elbo)
    assert -terms.loss > terms.elbo  # log mean w >= mean log w (Jensen), strictly here
    with pytest.raises(ValueError, match="K, B, D"):
        iwae_bound(x, model(x, eps=eps[0]))
