"""The latent sampler: a Gaussian mixture, checked against torch.distributions, and carried by
the saved model without scikit-learn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import distributions as D

from tests.conftest import assert_generates_without_sklearn, tiny_vae
from vae.core.sampler import GaussianMixture, fit_gmm, load_sampler, save_sampler
from vae.pyfunc import VAEPyfunc, load_vae_dir, save_vae_dir


def _mixture(seed: int = 0, m: int = 3, d: int = 2) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, d, d, generator=g)
    cov = a @ a.transpose(-1, -2) + 0.1 * torch.eye(d)
    weights = torch.rand(m, generator=g) + 0.2
    return GaussianMixture(weights, 3 * torch.randn(m, d, generator=g), torch.linalg.cholesky(cov))


def _reference(gmm: GaussianMixture) -> D.Distribution:
    return D.MixtureSameFamily(
        D.Categorical(probs=gmm.weights / gmm.weights.sum()),
        D.MultivariateNormal(gmm.means, scale_tril=gmm.scale_tril),
    )


def test_log_prob_matches_torch_distributions() -> None:
    gmm = _mixture()
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(1)) * 3
    torch.testing.assert_close(gmm.log_prob(z), _reference(gmm).log_prob(z))


def test_samples_have_the_mixture_moments_and_follow_the_seed() -> None:
    gmm = _mixture()
    z = gmm.sample(200_000, torch.Generator().manual_seed(0))
    ref = _reference(gmm)
    torch.testing.assert_close(z.mean(0), ref.mean, atol=0.05, rtol=0.0)
    torch.testing.assert_close(z.var(0), ref.variance, atol=0.0, rtol=0.03)
    a, b = (gmm.sample(5, torch.Generator().manual_seed(0)) for _ in range(2))
    assert torch.equal(a, b)


def test_a_mixture_at_temperature_t_scales_each_components_covariance_by_t_squared() -> None:
    gmm = _mixture()
    t = 0.5
    cold = _mixture()
    cold.scale_tril = gmm.scale_tril * t  # the closed form: Sigma_m -> t^2 Sigma_m
    a = gmm.sample(1000, torch.Generator().manual_seed(0), temperature=t)
    b = cold.sample(1000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    gmm.temperature = t  # the default a saved sampler carries
    assert torch.equal(
        gmm.sample(9, torch.Generator().manual_seed(1)),
        cold.sample(9, torch.Generator().manual_seed(1)),
    )


def test_fit_recovers_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-6.0, 0.0], [6.0, 0.0]])
    z = torch.cat([c + 0.5 * torch.randn(500, 2, generator=g) for c in centres])
    gmm = fit_gmm(z, 2, seed=0)
    found = gmm.means[gmm.means[:, 0].argsort()]
    torch.testing.assert_close(found, centres, atol=0.1, rtol=0.0)
    torch.testing.assert_close(gmm.weights, torch.tensor([0.5, 0.5]), atol=1e-3, rtol=0.0)
    assert gmm.weights.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"generate\.gmm_components"):
        fit_gmm(z[:3], 5, seed=0)


def test_sampler_file_round_trips(tmp_path: Path) -> None:
    gmm = _mixture()
    save_sampler(tmp_path / "s.safetensors", "gmm", {"gmm": gmm}, temperature=0.7)
    kind, back = load_sampler(tmp_path / "s.safetensors")
    assert kind == "gmm" and set(back) == {"gmm"} and back["gmm"].temperature == 0.7
    for name, tensor in gmm.tensors().items():
        assert torch.equal(back["gmm"].tensors()[name], tensor), name
    save_sampler(tmp_path / "p.safetensors", "prior", {"gmm": gmm})
    kind, back = load_sampler(tmp_path / "p.safetensors")
    assert kind == "prior" and back["gmm"].temperature == 1.0
    with pytest.raises(ValueError, match="not among the fitted"):
        save_sampler(tmp_path / "bad.safetensors", "gmm", {})


def test_a_format_1_sampler_file_still_loads(tmp_path: Path) -> None:
    """Before the diffusion sampler: a mixture's three tensors, unprefixed, no temperature."""
    from safetensors.torch import save_file

    gmm = _mixture()
    old = {k: v.contiguous() for k, v in gmm.tensors().items()}
    save_file(old, str(tmp_path / "old.safetensors"), {"kind": "gmm", "format": "1"})
    kind, back = load_sampler(tmp_path / "old.safetensors")
    assert kind == "gmm" and torch.equal(back["gmm"].means, gmm.means)
    save_file({}, str(tmp_path / "bad.safetensors"), {"kind": "gmm", "format": "1"})
    with pytest.raises(ValueError, match="holds no gmm"):
        load_sampler(tmp_path / "bad.safetensors")


def test_a_saved_model_generates_from_its_mixture_without_sklearn(tmp_path: Path) -> None:
    model = tiny_vae(latent_dim=2)
    prior = model.generate(4, torch.Generator().manual_seed(0))
    model.latent_sampler = _mixture()
    z = model.sample_latents(4, torch.Generator().manual_seed(0))
    assert torch.equal(z, model.latent_sampler.sample(4, torch.Generator().manual_seed(0)))
    mixed = model.generate(4, torch.Generator().manual_seed(0))
    assert not torch.equal(mixed, prior)
    save_vae_dir(model, tmp_path / "m")
    loaded = load_vae_dir(tmp_path / "m")
    out = VAEPyfunc(loaded).predict(None, {"mode": "generate", "n": 4, "seed": 0})
    torch.testing.assert_close(torch.from_numpy(out), mixed.flatten(1))
    # a consumer's process: loading the model and sampling it imports no scikit-learn
    assert_generates_without_sklearn(tmp_path / "m", "assert m.latent_sampler is not None")
