"""Evaluation: the importance-weighted log p(x) against a model whose p(x) is known exactly,
the metrics dict of a tiny trained VAE, chunking, and active units."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import torch
from torch.distributions import MultivariateNormal

from tests.conftest import mlp_config
from vae.config import EvaluateConfig
from vae.core.distributions import DiagonalGaussian, GaussianLikelihood, Likelihood, StandardNormal
from vae.core.hierarchy import HierarchicalPosterior, HierarchicalPrior
from vae.core.losses import negative_elbo
from vae.core.model import VAE
from vae.evaluation.evaluate import active_units, evaluate, iwae_log_likelihood
from vae.training.train import evaluate_elbo

KEYS = {
    "elbo",
    "recon",
    "kl",
    "kl_estimator",
    "nll_iw",
    "iw_samples",
    "elbo_gap",
    "bits_per_dim",
    "active_units",
    "kl_per_dim",
    "kl_per_layer",
    "active_units_per_layer",
    "n_images",
    "seconds",
    "images_x_samples_per_second",
}


class LinearGaussian:
    """Probabilistic PCA: z ~ N(0, I_d), x | z ~ N(W z + b, sigma^2 I), so x ~ N(b, WW^T + s^2 I).

    W has orthogonal columns, so the exact posterior N(M^-1 W^T (x - b), s^2 M^-1), with
    M = W^T W + s^2 I, is diagonal. ``encode`` returns it with its mean moved by ``mean_shift``
    posterior standard deviations and its variance scaled by ``var_scale``.
    """

    def __init__(self, d: int = 2, dx: int = 6, mean_shift: float = 0.0, var_scale: float = 1.0):
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(dx, d, generator=g, dtype=torch.float64))
        self.w = q * torch.linspace(2.0, 1.0, d, dtype=torch.float64)  # (dx, d)
        self.b = torch.randn(dx, generator=g, dtype=torch.float64)
        self.sigma2 = 0.3
        self.code_dim = d
        self.m = (self.w**2).sum(0) + self.sigma2  # diag(M), (d,)
        self.mean_shift, self.var_scale = mean_shift, var_scale

    def exact_posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        mean = (x - self.b) @ self.w / self.m  # (N, d)
        return DiagonalGaussian(mean, torch.log(self.sigma2 / self.m).expand_as(mean))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        p = self.exact_posterior(x)
        return DiagonalGaussian(
            p.mean + self.mean_shift * p.std, p.logvar + math.log(self.var_scale)
        )

    def prior(self) -> StandardNormal:
        return StandardNormal(self.code_dim)

    def decode(self, z: torch.Tensor) -> GaussianLikelihood:
        logvar = torch.tensor(math.log(self.sigma2), dtype=torch.float64)
        return GaussianLikelihood(z @ self.w.T + self.b, logvar, event_ndim=1)  # (..., dx)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.w @ self.w.T + self.sigma2 * torch.eye(len(self.b), dtype=torch.float64)
        return MultivariateNormal(self.b, cov).log_prob(x)

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) - KL(q(z|x) || p(z|x)), exactly."""
        q, p = self.encode(x), self.exact_posterior(x)
        ratio = (q.logvar - p.logvar).exp()
        kl = 0.5 * (ratio - 1 - (q.logvar - p.logvar) + (q.mean - p.mean) ** 2 / p.logvar.exp())
        return self.log_marginal(x) - kl.sum(-1)

    def sample(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        z = torch.randn(n, self.code_dim, generator=g, dtype=torch.float64)
        eps = torch.randn(n, len(self.b), generator=g, dtype=torch.float64)
        return z @ self.w.T + self.b + math.sqrt(self.sigma2) * eps


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tensors this small run fastest on one thread (and do not slow down on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The IWAE estimate against the exact log p(x)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_iwae_is_exact_with_the_exact_posterior(k: int) -> None:
    model = LinearGaussian()  # q(z|x) = p(z|x): every weight w_k equals p(x)
    x = model.sample(20)
    est = iwae_log_likelihood(model, x, k, _gen())
    torch.testing.assert_close(est, model.log_marginal(x), rtol=0, atol=1e-9)


def test_iwae_with_one_sample_is_an_unbiased_elbo() -> None:
    model = LinearGaussian(mean_shift=1.5, var_scale=2.0)
    x = model.sample(2000)
    diff = iwae_log_likelihood(model, x, 1, _gen()) - model.elbo(x)  # (N,), mean zero
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(len(x))


def test_iwae_error_shrinks_with_k() -> None:
    # q is off by 1.5 posterior std in mean and twice as wide: KL(q || p(z|x)) ~ 2.6 nats.
    model = LinearGaussian(mean_shift=1.5, var_scale=2.0)
    x = model.sample(300)
    log_px = model.log_marginal(x)
    errors = [
        float((log_px - iwae_log_likelihood(model, x, k, _gen())).mean()) for k in (1, 10, 1000)
    ]  # ~ [2.4, 0.24, 0.004] nats
    assert errors[0] > errors[1] > abs(errors[2])
    assert errors[1] < 0.2 * errors[0]
    assert abs(errors[2]) < 0.02


# ---------------------------------------------------------------------------------------------
# A tiny trained VAE


@pytest.fixture(scope="module")
def trained() -> tuple[VAE, torch.Tensor]:
    """A VAE trained for 300 steps on 256 noisy copies of 4 binary 8x8 patterns."""
    g = _gen(0)
    patterns = torch.rand(4, 1, 8, 8, generator=g).round()
    x = patterns[torch.randint(0, 4, (256,), generator=g)]
    x = (x + (torch.rand(x.shape, generator=g) < 0.05).float()) % 2  # flip 5% of pixels
    torch.manual_seed(0)
    model = VAE(mlp_config(latent_dim=4, hidden_dim=32), (1, 8, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(300):
        batch = x[(step * 64) % 256 :][:64]
        loss = negative_elbo(batch, model(batch, g)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x


def test_metrics_of_a_trained_vae(trained: tuple[VAE, torch.Tensor]) -> None:
    model, x = trained
    model.train()
    cfg = EvaluateConfig(iw_samples=64, batch_size=50, seed=0)
    m = evaluate(model, x, cfg)
    assert model.training  # the mode is restored

    assert set(m) == KEYS
    for key in ("iw_samples", "active_units", "n_images"):
        assert type(m[key]) is int, key
    per_layer = {"kl_per_layer", "active_units_per_layer"}  # null for one layer
    for key in (
        KEYS - {"iw_samples", "active_units", "n_images", "kl_per_dim", "kl_estimator"} - per_layer
    ):
        assert type(m[key]) is float and math.isfinite(m[key]), key
    assert json.loads(json.dumps(m)) == m
    assert (m["iw_samples"], m["n_images"]) == (64, 256)

    assert m["nll_iw"] <= -m["elbo"]
    assert m["elbo_gap"] == pytest.approx(-m["elbo"] - m["nll_iw"])
    assert m["elbo_gap"] > 0
    assert m["elbo"] == pytest.approx(-(m["recon"] + m["kl"]))
    assert len(m["kl_per_dim"]) == model.code_dim
    assert all(type(v) is float and v >= 0 for v in m["kl_per_dim"])
    assert sum(m["kl_per_dim"]) == pytest.approx(m["kl"], rel=1e-9)
    with torch.no_grad():
        assert m["kl"] == pytest.approx(float(model.encode(x).kl().mean()), rel=1e-5)
    assert 0 <= m["active_units"] <= model.code_dim
    assert m["active_units"] == active_units(model, x, 256, cfg.active_unit_threshold)[0]
    assert m["bits_per_dim"] == pytest.approx(m["nll_iw"] / (64 * math.log(2)))

    # The K-sample ELBO agrees with training's one-sample ELBO within noise.
    assert m["elbo"] == pytest.approx(float(evaluate_elbo(model, x, seed=1).elbo), abs=1.0)
    # Seeded: a second run gives the same numbers.
    again = evaluate(model, x, cfg)
    for key in KEYS - {"seconds", "images_x_samples_per_second"}:
        assert again[key] == m[key], key


def test_gaussian_bits_per_dim_adds_the_discretisation_term() -> None:
    torch.manual_seed(0)
    model = VAE(mlp_config(latent_dim=3, hidden_dim=16, likelihood="gaussian"), (1, 4, 4))
    x = torch.rand(10, 1, 4, 4, generator=_gen())
    m = evaluate(model, x, EvaluateConfig(iw_samples=4, batch_size=4))
    d = 16
    assert m["bits_per_dim"] == pytest.approx((m["nll_iw"] + d * math.log(256)) / (d * math.log(2)))


# ---------------------------------------------------------------------------------------------
# Chunking


def test_decoder_chunk_changes_memory_not_the_result(
    trained: tuple[VAE, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = trained
    x = x[:20]
    rows: list[int] = []
    decode = model.decode

    def spy(z: torch.Tensor) -> Likelihood:
        rows.append(math.prod(z.shape[:-1]))
        return decode(z)

    monkeypatch.setattr(model, "decode", spy)
    results = {}
    for chunk in (1, 64, 10**6):
        rows.clear()
        results[chunk] = iwae_log_likelihood(model, x, 100, _gen(3), chunk=chunk)
        assert max(rows) <= max(chunk, len(x)) and sum(rows) == 100 * len(x)
    torch.testing.assert_close(results[1], results[10**6], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(results[64], results[10**6], rtol=1e-6, atol=1e-5)


def test_image_batch_size_only_changes_the_noise(trained: tuple[VAE, torch.Tensor]) -> None:
    model, x = trained
    small = evaluate(model, x, EvaluateConfig(iw_samples=32, batch_size=7))
    whole = evaluate(model, x, EvaluateConfig(iw_samples=32, batch_size=256))
    assert small["kl"] == pytest.approx(whole["kl"], rel=1e-6)  # closed form: no noise
    assert small["active_units"] == whole["active_units"]
    assert small["nll_iw"] == pytest.approx(whole["nll_iw"], abs=0.2)


# ---------------------------------------------------------------------------------------------
# Active units


class _Encoder:
    """q(z|x) for x (N, 3): the mean follows x[:, 0], 2 x[:, 1] and 0.01 x[:, 2]; unit 3 is
    constant, though its posterior *variance* follows the input (that does not count)."""

    latent_dim = 4

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        mean = torch.stack([x[:, 0], 2 * x[:, 1], 0.01 * x[:, 2], torch.zeros(len(x))], -1)
        logvar = torch.zeros_like(mean)
        logvar[:, 3] = x[:, 0]
        return DiagonalGaussian(mean, logvar)


def test_active_units_counts_units_whose_mean_varies() -> None:
    x = torch.randn(500, 3, generator=_gen())
    count, variances = active_units(_Encoder(), x, batch_size=64, threshold=0.01)
    assert count == 2
    var = x.var(0, unbiased=False).double()  # (3,)
    expected = torch.stack([var[0], 4 * var[1], 1e-4 * var[2], torch.zeros((), dtype=var.dtype)])
    torch.testing.assert_close(variances, expected, rtol=1e-5, atol=1e-12)
    assert active_units(_Encoder(), x, batch_size=500, threshold=0.01)[0] == 2
    assert active_units(_Encoder(), x, batch_size=7, threshold=1e-5)[0] == 3
    assert active_units(_Encoder(), x, batch_size=7, threshold=10.0)[0] == 0


class _TwoLayers:
    """q(z2|x) with mean x[:, :2]; q(z1|x, z2) with mean 3 z2 + (x[:, 2], 0.001 x[:, 3]), and
    p(z1|z2) with mean 3 z2: z1's first unit adds x[:, 2] to what z2 says, its second next to
    nothing, however much both means move with x through z2."""

    def encode(self, x: torch.Tensor) -> HierarchicalPosterior:
        top = DiagonalGaussian(x[:, :2], torch.zeros(len(x), 2))

        def lower(h: torch.Tensor, z2: torch.Tensor) -> DiagonalGaussian:
            own = torch.stack([h[..., 2], 0.001 * h[..., 3]], -1)
            return DiagonalGaussian(3 * z2 + own, torch.zeros_like(z2))

        return HierarchicalPosterior(top, x, lower)

    def prior(self) -> HierarchicalPrior:
        return HierarchicalPrior(
            StandardNormal(2), lambda z2: DiagonalGaussian(3 * z2, torch.zeros_like(z2))
        )


def test_a_lower_layer_unit_is_active_by_what_it_adds_to_the_top_layer() -> None:
    x = torch.randn(400, 4, generator=_gen())
    count, variances = active_units(_TwoLayers(), x, batch_size=64, threshold=0.01)
    var = x.var(0, unbiased=False).double()
    want = torch.stack([var[2], 1e-6 * var[3], var[0], var[1]])  # [z1, z2]
    torch.testing.assert_close(variances, want, rtol=1e-4, atol=1e-9)
    assert count == 3  # z1's second unit copies p(z1|z2): its mean moves (9 var) but adds nothing
