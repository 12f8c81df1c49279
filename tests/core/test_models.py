"""The model variants behind the one VAE interface: deeper and gated MLPs, and the VampPrior."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import distributions as D

from tests.conftest import mlp_config
from vae.config import EvaluateConfig
from vae.core.distributions import DiagonalGaussian, VampPrior
from vae.core.losses import iwae_bound, negative_elbo
from vae.core.model import VAE
from vae.evaluation.evaluate import evaluate
from vae.pyfunc import VAEPyfunc, load_vae_dir, save_vae_dir

SHAPE = (1, 4, 4)


def _vae(**model: object) -> VAE:
    torch.manual_seed(0)
    return VAE(mlp_config(latent_dim=3, hidden_dim=8, **model), SHAPE)


def _batch(n: int = 6) -> torch.Tensor:
    return torch.bernoulli(torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1)))


def test_vamp_prior_density_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    comps = DiagonalGaussian(torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g))
    ref = D.MixtureSameFamily(
        D.Categorical(logits=torch.zeros(5)), D.Independent(D.Normal(comps.mean, comps.std), 1)
    )
    z = 2 * torch.randn(4, 7, 3, generator=g)
    torch.testing.assert_close(VampPrior(comps).log_prob(z), ref.log_prob(z))
    draws = VampPrior(comps).sample(100_000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(draws.mean(0), ref.mean, atol=0.03, rtol=0.0)


def test_vamp_elbo_uses_the_monte_carlo_kl_of_the_decoded_z() -> None:
    model, x = _vae(prior="vamp", pseudo_inputs=4), _batch()
    out = model(x, torch.Generator().manual_seed(2))
    terms = negative_elbo(x, out)
    prior = VampPrior(model.encode(torch.sigmoid(model.pseudo_inputs)))
    by_hand = (out.posterior.log_prob(out.z) - prior.log_prob(out.z)).mean()
    torch.testing.assert_close(terms.kl, by_hand)
    torch.testing.assert_close(terms.elbo, -(terms.recon + by_hand))
    # with one sample, the iwae bound is that same Monte Carlo ELBO
    eps = (out.z - out.posterior.mean) / out.posterior.std
    one = iwae_bound(x, model(x, eps=eps[None]))
    torch.testing.assert_close(-one.loss, terms.elbo)
    terms.loss.backward()  # the pseudo-inputs are learned through the prior term
    assert model.pseudo_inputs.grad is not None and model.pseudo_inputs.grad.abs().sum() > 0


def test_vamp_evaluation_says_its_kl_is_estimated() -> None:
    model, x = _vae(prior="vamp", pseudo_inputs=4), _batch(20)
    metrics = evaluate(model, x, EvaluateConfig(iw_samples=16, batch_size=7))
    assert metrics["kl_estimator"] == "monte_carlo_16_samples"
    assert metrics["kl_per_dim"] is None and math.isfinite(metrics["kl"])
    assert metrics["nll_iw"] <= -metrics["elbo"]
    standard = evaluate(_vae(), x, EvaluateConfig(iw_samples=16, batch_size=7))
    assert standard["kl_estimator"] == "closed_form"
    assert standard["kl"] == pytest.approx(sum(standard["kl_per_dim"]))


@pytest.mark.parametrize(
    "model",
    [
        {"prior": "vamp", "pseudo_inputs": 4},
        {"arch": "gated_mlp", "hidden_layers": 2},
        {"arch": "mlp", "hidden_layers": 3},
        {"arch": "resnet", "conv_channels": 2},
        {"arch": "gated_conv", "conv_channels": 2, "prior": "vamp", "pseudo_inputs": 3},
    ],
    ids=["vamp", "gated2", "mlp3", "resnet", "gated_conv"],
)
def test_variants_round_trip_through_the_registered_format(tmp_path: Path, model: dict) -> None:
    vae, x = _vae(**model), _batch()
    save_vae_dir(vae, tmp_path / "m")
    back = load_vae_dir(tmp_path / "m")
    pyfunc = VAEPyfunc(back)
    flat = x.flatten(1).numpy()
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(pyfunc.predict(flat)), vae.encode(x).mean)
        want = vae.generate(5, torch.Generator().manual_seed(3))
    got = pyfunc.predict(None, {"mode": "generate", "n": 5, "seed": 3})
    torch.testing.assert_close(torch.from_numpy(got), want.flatten(1))


def test_deeper_mlps_keep_the_layout_of_one_layer_models() -> None:
    """A one-layer model's parameter names are those of the models saved before hidden_layers."""
    names = set(_vae().state_dict())
    assert names == {
        f"{p}.net.{i}.{w}"
        for p, i in (("encoder", 1), ("encoder", 3), ("decoder", 0), ("decoder", 2))
        for w in ("weight", "bias")
    }
    gated = _vae(arch="gated_mlp", hidden_layers=2)
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in gated.modules()) == 0  # gates, not acts
    assert gated.encoder(_batch()).shape == (6, 6)
    assert gated.decode(torch.zeros(2, 3)).mean.shape == (2, *SHAPE)


def test_evaluation_on_a_fixed_subset_uses_the_first_images() -> None:
    model, x = _vae(), _batch(20)
    part = evaluate(model, x, EvaluateConfig(iw_samples=4, batch_size=7, max_images=8))
    alone = evaluate(model, x[:8], EvaluateConfig(iw_samples=4, batch_size=7))
    assert part["n_images"] == 8
    assert part["nll_iw"] == alone["nll_iw"] and part["elbo"] == alone["elbo"]


def test_vamp_density_stays_exact_when_a_component_collapses() -> None:
    """A pseudo-input whose posterior variance has shrunk to e^-25: the expanded quadratic form
    cancels catastrophically in float32 (a training run diverged on it), so it runs in float64."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(50, 8, generator=g)
    logvar = torch.full((50, 8), -25.0)
    z = mean[:16] + 1e-7 * torch.randn(16, 8, generator=g)
    got = VampPrior(DiagonalGaussian(mean, logvar)).log_prob(z)
    ref = D.MixtureSameFamily(
        D.Categorical(logits=torch.zeros(50, dtype=torch.float64)),
        D.Independent(D.Normal(mean.double(), torch.exp(0.5 * logvar.double())), 1),
    ).log_prob(z.double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=0.01, rtol=0.0)


def test_an_encoder_needs_features_and_a_head_not_a_sequential() -> None:
    """VAE.encode reads ``encoder.features`` and ``encoder.head``; both layers counts work with
    an encoder that is no Sequential, and the built-in ones give what their forward gives."""
    from vae.core.layers import Encoder

    class Split(Encoder):
        def __init__(self, trunk: torch.nn.Module, head: torch.nn.Module) -> None:
            super().__init__()
            self.trunk, self.head = trunk, head

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return self.trunk(x)

    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for layers in (1, 2):
        torch.manual_seed(0)
        model = VAE(mlp_config(latent_dim=3, hidden_dim=8, latent_layers=layers)).eval()
        net = model.encoder.net
        with torch.no_grad():
            want = model.encode(x)
            assert torch.equal(model.encoder(x), net(x))
            model.encoder = Split(net[:-1], net[-1])
            got = model.encode(x)
        assert torch.equal(got.mean, want.mean) and torch.equal(got.logvar, want.logvar)
