"""The diffusion sampler: its schedule and DDIM steps against closed forms, its fit on data
whose answer is known, and its round trip through the sampler file and the registered model."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_generates_without_sklearn, tiny_vae
from vae.core.diffusion import LatentDiffusion, T, cosine_alpha_bar
from vae.core.sampler import load_sampler, save_sampler
from vae.pyfunc import VAEPyfunc, load_vae_dir, save_vae_dir
from vae.training.latent import DiffusionSettings, fit_diffusion


def _model(dim: int = 3, active: tuple[int, ...] = (0, 2), steps: int = 10) -> LatentDiffusion:
    torch.manual_seed(0)
    model = LatentDiffusion(dim, len(active), hidden=16, blocks=1, steps=steps)
    z = torch.randn(100, dim, generator=torch.Generator().manual_seed(0)) * 2.0 + 1.0
    model.standardize_to(z, torch.tensor(active))
    return model.eval()


def test_the_cosine_schedule_is_nichol_and_dhariwals() -> None:
    abar = cosine_alpha_bar()
    assert abar.shape == (T,) and bool((abar[1:] <= abar[:-1]).all())
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 250, 500, 999):
        assert float(abar[t]) == pytest.approx(max(f(t + 1) / f(0), 1e-5), rel=1e-5)


def test_noising_has_the_moments_of_q_xt_given_x0() -> None:
    model = _model()
    x0 = torch.tensor([[1.5, -0.5]]).expand(200_000, 2)
    t = torch.full((200_000,), 300)
    eps = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(1))
    xt = model.noised(x0, t, eps)
    a = float(model.alpha_bar[300])
    torch.testing.assert_close(xt.mean(0), math.sqrt(a) * x0[0], atol=0.01, rtol=0.0)
    torch.testing.assert_close(xt.var(0), torch.full((2,), 1 - a), atol=0.0, rtol=0.02)


def test_ddim_with_the_exact_noise_predictor_of_gaussian_data_is_its_closed_form(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """For x_0 ~ N(0, I) the best noise prediction is E[eps | x_t] = sqrt(1 - abar_t) x_t, and
    one DDIM step from abar to abar' multiplies x by c = sqrt(abar abar') +
    sqrt((1 - abar)(1 - abar')): a draw is loc + scale * t * prod(c) * noise in the modelled
    dimensions, and loc + scale * t * noise in the others (with the box opened)."""
    model = _model()
    model.low.fill_(-math.inf)
    model.high.fill_(math.inf)
    oracle = lambda x, t: (1 - model.alpha_bar[t]).sqrt().unsqueeze(-1) * x  # noqa: E731
    monkeypatch.setattr(model, "forward", oracle)
    ts = model.timesteps().tolist()
    assert ts[0] == T - 1 and ts[-1] == 0 and len(ts) == model.steps
    c = _shrink(model)
    t = 0.7
    z = model.sample(5, torch.Generator().manual_seed(3), temperature=t)
    noise = t * torch.randn((5, 3), generator=torch.Generator().manual_seed(3))
    expected = model.loc + model.scale * noise
    expected[:, [0, 2]] = model.loc[[0, 2]] + model.scale[[0, 2]] * c * noise[:, [0, 2]]
    torch.testing.assert_close(z, expected)
    # DDIM's steps shrink N(0, I) a little (the ODE itself would keep it), less as they grow
    assert 0.85 < c < _shrink(_model(steps=50)) < 1.0


def _shrink(model: LatentDiffusion) -> float:
    abar = [float(model.alpha_bar[t]) for t in model.timesteps().tolist()] + [1.0]
    steps = itertools.pairwise(abar)
    return math.prod(math.sqrt(a * b) + math.sqrt((1 - a) * (1 - b)) for a, b in steps)


def test_no_draw_leaves_the_box_of_the_training_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    monkeypatch.setattr(model, "forward", lambda x, t: -10.0 * x)  # a wild noise prediction
    x = model.standardized(model.sample(1000, torch.Generator().manual_seed(0), 3.0))
    assert bool((x >= model.low - 1e-5).all() and (x <= model.high + 1e-5).all())
    assert bool((model.low < -1.0).all() and (model.high > 1.0).all())  # set from the codes


def _two_clusters(n: int) -> torch.Tensor:
    """(n, 3) codes: dims 0, 1 two clusters at (+-3, 0) with spread 0.3; dim 2 nearly constant."""
    g = torch.Generator().manual_seed(0)
    side = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    z = torch.randn(n, 3, generator=g) * torch.tensor([0.3, 0.3, 0.02])
    z[:, 0] += 3.0 * side
    return z


def test_the_fit_finds_both_clusters_and_is_deterministic() -> None:
    z = _two_clusters(2000)
    s = DiffusionSettings(hidden=64, blocks=2, epochs=40, lr=3e-3, steps=25, seed=0)
    model, record = fit_diffusion(z[:1600], z[1600:], s)
    assert record["active_dims"] == 2 and model.active.tolist() == [0, 1]  # dim 2: 4e-4 variance
    x = model.sample(4000, torch.Generator().manual_seed(0))
    right = x[:, 0] > 0
    assert 0.4 < float(right.float().mean()) < 0.6  # both modes, in their proportion
    for side in (right, ~right):
        assert abs(float(x[side, 0].abs().median()) - 3.0) < 0.3
    assert float((x[:, 0].abs() < 1.5).float().mean()) < 0.1  # the gap between them, nearly empty
    torch.testing.assert_close(x[:, 2].std(), torch.tensor(0.02), atol=0.003, rtol=0.0)
    again, _ = fit_diffusion(z[:1600], z[1600:], s)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_diffusion_round_trips_through_the_sampler_file(tmp_path: Path) -> None:
    model = _model()
    for p in model.parameters():
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    save_sampler(tmp_path / "s.safetensors", "diffusion", {"diffusion": model}, temperature=0.9)
    kind, fitted = load_sampler(tmp_path / "s.safetensors")
    back = fitted["diffusion"]
    assert kind == "diffusion" and back.temperature == 0.9 and back.settings() == model.settings()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    model.temperature = 0.9
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(back.sample(6, g()), model.sample(6, g()))


def test_equal_samplers_write_equal_bytes(tmp_path: Path) -> None:
    """The file's sha256 names the sampler: the metadata must not come out in a random order
    (safetensors writes several entries as its hash map lists them), nor in another process."""
    model = _model()
    fitted = {"diffusion": model}
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in paths[:2]:
        save_sampler(path, "diffusion", fitted, temperature=1.2)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    code = (
        "import sys, torch; from vae.core.diffusion import LatentDiffusion;"
        "from vae.core.sampler import save_sampler;"
        f"m = LatentDiffusion(**{model.settings()!r});"
        f"m.load_state_dict(torch.load({str(tmp_path / 'state.pt')!r}));"
        f"save_sampler({str(paths[2])!r}, 'diffusion', {{'diffusion': m}}, temperature=1.2)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()


def test_a_saved_model_generates_from_its_diffusion_sampler_with_torch_alone(
    tmp_path: Path,
) -> None:
    vae = tiny_vae(latent_dim=3)
    vae.latent_sampler = _model(dim=3)
    vae.latent_sampler.temperature = 0.8
    expected = vae.generate(4, torch.Generator().manual_seed(0))
    save_vae_dir(vae, tmp_path / "m")
    loaded = load_vae_dir(tmp_path / "m")
    assert loaded.latent_sampler is not None and loaded.latent_sampler.temperature == 0.8
    out = VAEPyfunc(loaded).predict(None, {"mode": "generate", "n": 4, "seed": 0})
    torch.testing.assert_close(torch.from_numpy(out), expected.flatten(1))
    assert_generates_without_sklearn(tmp_path / "m", "assert m.latent_sampler.kind == 'diffusion'")
