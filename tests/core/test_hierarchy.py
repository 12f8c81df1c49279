"""Two stochastic layers (model.latent_layers: 2): densities, bounds, metrics and formats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import distributions as D

from tests.conftest import mlp_config, write_params
from tests.training.conftest import prepared  # noqa: F401  (the fixture)
from vae.cli import main
from vae.config import ConfigError, EvaluateConfig
from vae.core.hierarchy import HierarchicalPosterior, HierarchicalPrior, SharedTopDown
from vae.core.layers import Gated
from vae.core.losses import iwae_bound, negative_elbo
from vae.core.model import VAE
from vae.core.sampler import load_sampler
from vae.evaluation.evaluate import evaluate
from vae.params import load_params, parse_params
from vae.pyfunc import save_vae_dir
from vae.serving.consume import LoadedModel
from vae.training.checkpoint import load_model

SHAPE = (1, 4, 4)


def _vae(**model: object) -> VAE:
    torch.manual_seed(0)
    return VAE(mlp_config(latent_dim=3, hidden_dim=8, latent_layers=2, **model), SHAPE)


def _batch(n: int = 6) -> torch.Tensor:
    return torch.bernoulli(torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1)))


def _normal(mean_logvar: torch.Tensor) -> D.Independent:
    mean, logvar = mean_logvar.chunk(2, dim=-1)
    return D.Independent(D.Normal(mean, torch.exp(0.5 * logvar)), 1)


@pytest.mark.parametrize("arch", ["mlp", "gated_mlp", "conv", "resnet", "gated_conv"])
def test_two_layer_densities_match_torch_distributions(arch: str) -> None:
    """log q(z|x) = log q(z2|x) + log q(z1|x, z2), log p(z) = log p(z2) + log p(z1|z2), with
    every conditional rebuilt here from the networks' raw outputs: q(z1|x, z2) reads x through
    a branch of its own, and p(z1|z2) has two hidden layers."""
    model, x = _vae(arch=arch, conv_channels=2), _batch()
    td = model.top_down
    assert sum(isinstance(m, torch.nn.Linear | Gated) for m in td.p_net) == 3  # 2 hidden + head
    with torch.no_grad():
        q, prior = model.encode(x), model.prior()
        assert isinstance(q, HierarchicalPosterior) and isinstance(prior, HierarchicalPrior)
        z = q.sample(torch.Generator().manual_seed(2), n=5)  # (5, B, 6)
        assert z.shape == (5, 6, 6)
        z1, z2 = z[..., :3], z[..., 3:]
        q2 = _normal(model.encoder.net(x))
        hx = td.q_x(x).expand(5, 6, -1)  # x's own branch, not the encoder's features
        q1 = _normal(td.q_joint(torch.cat([hx, td.q_z2(z2)], -1)))
        p2 = D.Independent(D.Normal(torch.zeros(3), torch.ones(3)), 1)
        p1 = _normal(td.p_net(z2))
        torch.testing.assert_close(q.log_prob(z), q2.log_prob(z2) + q1.log_prob(z1))
        torch.testing.assert_close(prior.log_prob(z), p2.log_prob(z2) + p1.log_prob(z1))
        # the embedding: E[z2|x], then E[z1 | x, z2 = E[z2|x]]
        m2 = q2.base_dist.mean
        m1 = td.q_joint(torch.cat([td.q_x(x), td.q_z2(m2)], -1)).chunk(2, -1)[0]
        torch.testing.assert_close(q.mean, torch.cat([m1, m2], -1))


def test_the_first_design_still_loads_from_a_checkpoint_without_the_key(tmp_path: Path) -> None:
    """A two-layer model saved before model.lower_inference: q(z1|h(x), z2) on the encoder's
    features, one hidden layer each; it loads as that model, weights and densities equal."""
    from vae.config import DataConfig
    from vae.training.checkpoint import save_model

    old = _vae(arch="gated_mlp", lower_inference="shared")
    assert isinstance(old.top_down, SharedTopDown)
    save_model(tmp_path / "model.pt", old, DataConfig(), {})
    obj = torch.load(tmp_path / "model.pt", weights_only=True)
    del obj["params"]["model"]["lower_inference"]  # as the first design wrote it
    torch.save(obj, tmp_path / "model.pt")
    back, _ = load_model(tmp_path / "model.pt")
    assert back.cfg.lower_inference == "shared"
    x = _batch()
    with torch.no_grad():
        z = old.encode(x).sample(torch.Generator().manual_seed(0))
        h = old.encoder.net[:-1](x)
        q1 = _normal(old.top_down.q_net(torch.cat([h, z[:, 3:]], -1)))
        torch.testing.assert_close(back.encode(x).log_prob(z), old.encode(x).log_prob(z))
        torch.testing.assert_close(old.encode(x).log_prob_layers(z)[:, 0], q1.log_prob(z[:, :3]))
    # a one-layer model saved before the key loads against today's params, unchanged
    one = VAE(mlp_config(latent_dim=3), SHAPE)
    save_model(tmp_path / "one.pt", one, DataConfig(), {})
    obj = torch.load(tmp_path / "one.pt", weights_only=True)
    del obj["params"]["model"]["lower_inference"]
    torch.save(obj, tmp_path / "one.pt")
    assert load_model(tmp_path / "one.pt", expected=one.cfg)[0].cfg == one.cfg


def test_the_density_of_a_draw_reuses_the_lower_posterior_it_was_drawn_from() -> None:
    """q(z1|x, z2) runs once per draw: log q of the drawn z (or of its float64 copy, as the
    evaluation scores it) reuses it, with the values and gradients of recomputing it; any other
    z recomputes it."""
    model, x = _vae(prior="vamp", pseudo_inputs=4), _batch()
    calls = []
    model.top_down.q_joint[1].register_forward_hook(lambda *_: calls.append(1))
    q = model.encode(x)
    z = q.sample(torch.Generator().manual_seed(2), n=5)
    assert len(calls) == 1
    for same in (z, z.detach().double()):
        with torch.no_grad():  # a posterior that drew nothing computes it
            fresh = model.encode(x).log_prob_layers(same.detach())
        assert torch.equal(q.log_prob_layers(same), fresh)
    assert len(calls) == 3
    q.log_prob_layers(z.detach() + 1.0)  # another z: q(z1|x, z2) at its own z2
    assert len(calls) == 4
    params = list(model.parameters())
    reused = torch.autograd.grad(q.log_prob(z).sum(), params, retain_graph=True, allow_unused=True)
    again = torch.autograd.grad(q.log_prob(z.clone()).sum(), params, allow_unused=True)
    assert len(calls) == 5  # the clone is another tensor that needs gradients: recomputed
    for a, b in zip(reused, again, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    for loss, eps in ((iwae_bound, torch.randn(3, 6, 6)), (negative_elbo, torch.randn(6, 6))):
        calls.clear()
        loss(x, model(x, eps=eps)).loss.backward()  # the training step's forward: one pass
        assert len(calls) == 1


def test_sampling_draws_the_top_layer_first() -> None:
    model = _vae(prior="vamp", pseudo_inputs=4)
    with torch.no_grad():
        prior = model.prior()
        z = prior.sample(20_000, torch.Generator().manual_seed(0))
        assert z.shape == (20_000, 6)
        # z1 | z2 is the learned Gaussian p(z1|z2): standardised, its residuals are N(0, 1)
        p1 = model.top_down.prior(z[:, 3:])
        r = (z[:, :3] - p1.mean) / p1.std
        torch.testing.assert_close(r.mean(0), torch.zeros(3), atol=0.03, rtol=0)
        torch.testing.assert_close(r.std(0), torch.ones(3), atol=0.03, rtol=0)
        assert model.generate(4, torch.Generator().manual_seed(1)).shape == (4, *SHAPE)


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_elbo_is_the_monte_carlo_kl_and_iwae_k1_equals_it(prior: str) -> None:
    model, x = _vae(prior=prior, pseudo_inputs=4), _batch()
    eps = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    out = model(x, eps=eps)
    terms = negative_elbo(x, out)
    kl = (out.posterior.log_prob(out.z) - out.prior.log_prob(out.z)).mean()
    torch.testing.assert_close(terms.kl, kl)
    torch.testing.assert_close(terms.elbo, (out.likelihood.log_prob(x)).mean() - kl)
    one = iwae_bound(x, model(x, eps=eps[None]))
    torch.testing.assert_close(-one.loss, terms.elbo)
    terms.loss.backward()  # both conditionals of the lower layer learn, every branch of them
    td = model.top_down
    for net in (td.q_x, td.q_z2, td.q_joint, td.p_net):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_evaluation_reports_each_layer() -> None:
    model, x = _vae(), _batch(20)
    m = evaluate(model, x, EvaluateConfig(iw_samples=16, batch_size=7, active_unit_threshold=0))
    assert m["kl_estimator"] == "monte_carlo_16_samples" and m["kl_per_dim"] is None
    assert len(m["kl_per_layer"]) == 2 and math.fsum(m["kl_per_layer"]) == pytest.approx(m["kl"])
    assert m["active_units_per_layer"] == [3, 3] and m["active_units"] == 6
    assert m["nll_iw"] <= -m["elbo"]
    one = evaluate(VAE(mlp_config(latent_dim=3), SHAPE), x, EvaluateConfig(iw_samples=4))
    assert one["kl_per_layer"] is None and one["active_units_per_layer"] is None


def test_registered_format_and_consumers_see_both_layers(tmp_path: Path) -> None:
    from vae.pyfunc import VAEPyfunc, load_vae_dir

    model, x = _vae(arch="gated_mlp", prior="vamp", pseudo_inputs=4), _batch()
    save_vae_dir(model, tmp_path / "data" / "vae")
    back = VAEPyfunc(load_vae_dir(tmp_path / "data" / "vae"))
    with torch.no_grad():
        want = model.encode(x)
        got = back.predict(x.flatten(1).numpy(), {"logvar": True})
        torch.testing.assert_close(torch.from_numpy(got), torch.cat([want.mean, want.logvar], -1))
        drawn = back.predict(None, {"mode": "generate", "n": 3, "seed": 1})
        torch.testing.assert_close(
            torch.from_numpy(drawn), model.generate(3, torch.Generator().manual_seed(1)).flatten(1)
        )
    assert LoadedModel(None, tmp_path).code_dim == 6  # embedding columns for [z1, z2]


def test_params_refuse_a_third_layer_and_free_bits_that_do_not_fit_the_layers() -> None:
    base = load_params("params.yaml").to_dict()
    for model, train_, words in (
        ({"latent_layers": 3}, {}, ["model.latent_layers", "<= 2"]),
        ({"latent_layers": 2}, {"free_bits": [0.1, 0.1, 0.1]}, ["train.free_bits", "one per"]),
        ({"latent_layers": 1}, {"free_bits": [0.1, 0.1]}, ["train.free_bits", "latent_layers"]),
        ({"latent_layers": 2}, {"free_bits": [0.1, -1.0]}, ["train.free_bits[1]", ">= 0"]),
        ({"lower_inference": "shared"}, {}, ["model.lower_inference", "latent_layers"]),
    ):
        raw = {**base, "model": {**base["model"], **model}, "train": {**base["train"], **train_}}
        with pytest.raises(ConfigError) as err:
            parse_params(raw)
        assert all(w in str(err.value) for w in words), str(err.value)
    raw = {**base, "model": {**base["model"], "latent_layers": 2}}
    raw["train"] = {**base["train"], "free_bits": [0.2, 0.0]}
    assert parse_params(raw).train.free_bits_per_layer(2) == (0.2, 0.0)


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_free_bits_floor_each_layers_monte_carlo_kl(prior: str) -> None:
    """Free bits by groups: each layer's batch-mean KL is floored at its free_bits x latent_dim;
    the ELBO itself is never floored, and a floored layer passes no gradient through its KL."""
    model, x = _vae(prior=prior, pseudo_inputs=4), _batch()
    out = model(x, eps=torch.randn(6, 6, generator=torch.Generator().manual_seed(3)))
    per_layer = (
        torch.stack(
            [
                out.posterior.log_prob_layers(out.z)[:, i] - out.prior.log_prob_layers(out.z)[:, i]
                for i in range(2)
            ]
        )
        .mean(1)
        .detach()
    )  # (2,): [z1, z2]
    high = float(per_layer.max()) + 1.0  # nats per dimension above both layers' KL / 3
    plain = negative_elbo(x, out)
    for fb, want in (
        ((0.0, 0.0), per_layer.sum()),
        ((high, 0.0), 3 * high + per_layer[1]),
        ((0.0, high), per_layer[0] + 3 * high),
        (high, 6 * high),
    ):
        terms = negative_elbo(x, out, kl_weight=0.5, free_bits=fb)
        torch.testing.assert_close(terms.loss, terms.recon + 0.5 * want)
        torch.testing.assert_close(terms.elbo, plain.elbo)  # the true bound, never floored
    negative_elbo(x, out, free_bits=(high, 0.0)).loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.top_down.p_net.parameters())


@pytest.mark.slow
def test_two_layers_through_every_stage(prepared: Path) -> None:  # noqa: F811
    """train, evaluate, export, generate (both samplers), classify and score, on tiny data."""
    write_params(Path("params.yaml"), model={"latent_layers": 2})
    for stage in ("train", "evaluate", "export", "generate", "classify", "score"):
        assert main(["-q", stage]) == 0, stage
    model, _ = load_model("models/model.pt", expected=load_params().model)
    assert isinstance(model.prior(), HierarchicalPrior)
    ev = json.loads(Path("metrics/eval.json").read_text())
    assert len(ev["kl_per_layer"]) == 2 and len(ev["active_units_per_layer"]) == 2
    assert json.loads(Path("metrics/downstream.json").read_text())["latent_dim"] == 8
    _, fitted = load_sampler("models/sampler.safetensors")
    for density in fitted.values():  # both fitted to the whole code [z1, z2]
        assert density.sample(3, torch.Generator().manual_seed(0)).shape == (3, 8)
    sets = json.loads(Path("metrics/quality.json").read_text())["sets"]
    assert all(math.isfinite(m["fid"]) for m in sets.values())


def test_the_papers_layout_bounds_every_log_variance() -> None:
    """Every Gaussian of the branch layout (q(z2|x), the pseudo-inputs' components, q(z1|x, z2),
    p(z1|z2)) has logvar in [-6, 2], as the paper's code bounds them; one layer and the first
    design keep the wide [-30, 20]. An image the encoder maps far out cannot draw z2 with a
    standard deviation of e^10, as one training image did in a seed of the hvae preset."""
    x = _batch() * 1e4  # drive every pre-activation far out
    for layout, (lo, hi) in (("branch", (-6.0, 2.0)), ("shared", (-30.0, 20.0))):
        model = _vae(arch="mlp", prior="vamp", pseudo_inputs=4, lower_inference=layout)
        with torch.no_grad():
            for layer in model.modules():  # push the heads' log-variances both ways
                if isinstance(layer, torch.nn.Linear) and layer.out_features == 6:
                    layer.bias[3:] = torch.tensor([1e3, -1e3, 0.0])
            q, prior = model.encode(x), model.prior()
            z = q.sample(torch.Generator().manual_seed(0))
            for g in (q.top, q._lower_at(z[:, 3:]), prior.top.components, prior.lower(z[:, 3:])):
                assert g.logvar.min() >= lo and g.logvar.max() <= hi
                assert g.logvar.max() == hi and g.logvar.min() == lo, layout
    one = VAE(mlp_config(latent_dim=3, hidden_dim=8), SHAPE)
    with torch.no_grad():
        one.encoder.net[-1].bias[3:] = 1e3
        assert one.encode(_batch()).logvar.max() == 20.0


def test_mean_bound_softly_bounds_every_gaussians_mean(tmp_path: Path) -> None:
    """With model.mean_bound B, every Gaussian of q(z|x) and p(z) (q(z2|x), the pseudo-inputs'
    components, q(z1|x, z2), p(z1|z2)) has mean B * tanh(raw / B): never past B, where in a seed
    of the hvae preset one image's q(z2|x) mean reached 46 and the lower conditionals 6,000.
    The densities stay the Normal of the bounded mean; a model saved before the key loads
    unbounded."""
    from vae.config import DataConfig
    from vae.training.checkpoint import save_model

    x = _batch() * 1e4  # drive every pre-activation far out
    model = _vae(arch="mlp", prior="vamp", pseudo_inputs=4, mean_bound=3.0)
    with torch.no_grad():
        for layer in model.modules():  # push the heads' means far out, both ways
            if isinstance(layer, torch.nn.Linear) and layer.out_features == 6:
                layer.bias[:3] = torch.tensor([1e3, -1e3, 0.0])
        q, prior = model.encode(x), model.prior()
        z = q.sample(torch.Generator().manual_seed(0))
        td, z2 = model.top_down, z[:, 3:]
        for g in (q.top, q._lower_at(z2), prior.top.components, prior.lower(z2)):
            assert g.mean.abs().max() <= 3.0 and g.mean.abs().max() > 2.9
        raw = td.p_net(z2).chunk(2, -1)
        p1 = D.Independent(D.Normal(3.0 * torch.tanh(raw[0] / 3.0), torch.exp(0.5 * raw[1])), 1)
        torch.testing.assert_close(prior.lower(z2).log_prob(z[:, :3]), p1.log_prob(z[:, :3]))
        # well inside B it is near the identity: |tanh(u) - u| <= u^3 / 3
        small = _vae(arch="mlp", mean_bound=100.0).encode(_batch()).top.mean
        free = _vae(arch="mlp").encode(_batch()).top.mean
        torch.testing.assert_close(small, free, atol=1e-4, rtol=1e-4)
    save_model(tmp_path / "model.pt", _vae(arch="mlp"), DataConfig(), {})
    obj = torch.load(tmp_path / "model.pt", weights_only=True)
    del obj["params"]["model"]["mean_bound"]  # as models saved before the key were written
    torch.save(obj, tmp_path / "model.pt")
    assert load_model(tmp_path / "model.pt")[0].cfg.mean_bound == 0.0
