"""Test-set evaluation: the ELBO and its terms, an importance-weighted log p(x), active units.

The ELBO is only a lower bound on log p(x). The importance-weighted bound (Burda et al. 2016,
"Importance Weighted Autoencoders") with K samples z_k ~ q(z|x),

    log p(x) >= L_K = log (1/K) sum_k w_k,    w_k = p(x|z_k) p(z_k) / q(z_k|x),

tightens as K grows and tends to log p(x) as K -> inf. The ELBO reported by ``evaluate`` is the
mean of log w_k over the *same* K samples (an unbiased K-sample ELBO estimate), so by Jensen's
inequality nll_iw <= -elbo holds for every image, and ``elbo_gap`` = -elbo - nll_iw >= 0 is the
part of log p(x) that the ELBO misses, never an artefact of Monte Carlo noise.

Memory stays bounded: ``evaluate`` sends images through in chunks of ``evaluate.batch_size``,
and each chunk's K samples are decoded at most ``chunk`` latent vectors at a time. The noise is
drawn for all K samples at once, (K, B, D), so the result does not depend on ``chunk``.

The functions here are pure: no file IO and no logging; they take an explicit generator.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import torch

from vae.config import EvaluateConfig
from vae.core.distributions import DiagonalGaussian, Likelihood, Prior
from vae.core.hierarchy import HierarchicalPosterior, HierarchicalPrior
from vae.core.model import VAE, eval_mode

__all__ = ["LatentVariableModel", "active_units", "evaluate", "iwae_log_likelihood"]

DECODE_ROWS = 4096  # latent vectors decoded at once: 4096 x 784 float32 pixels is ~13 MB


class LatentVariableModel(Protocol):
    """What the estimators need: ``VAE`` fits, and so does any stand-in with a known p(x)."""

    latent_dim: int

    def encode(self, x: torch.Tensor) -> DiagonalGaussian: ...

    def decode(self, z: torch.Tensor) -> Likelihood: ...

    def prior(self) -> Prior: ...


def _log_weights(
    model: LatentVariableModel,
    x: torch.Tensor,
    q: DiagonalGaussian,
    k: int,
    generator: torch.Generator | None,
    chunk: int,
    prior: Prior | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x|z_k) (K, B) and log p(z_k) - log q(z_k|x) per stochastic layer (K, B, L) for
    z_k ~ q, float64; x (B, ...). log w_k is the first plus the second summed over layers.
    ``prior`` is ``model.prior()`` unless given.
    """
    prior = model.prior() if prior is None else prior
    z = q.sample(generator, n=k)  # (K, B, D), one draw: independent of ``chunk``
    step = max(1, chunk // x.shape[0])  # samples per decoder call: step * B <= max(chunk, B) rows
    ll = torch.cat([model.decode(z[i : i + step]).log_prob(x) for i in range(0, k, step)])
    z = z.double()  # the prior and posterior terms nearly cancel: keep their digits
    if isinstance(prior, HierarchicalPrior):  # one log-ratio per stochastic layer
        return ll.double(), prior.log_prob_layers(z) - q.log_prob_layers(z)  # (K, B), (K, B, 2)
    return ll.double(), (prior.log_prob(z) - q.log_prob(z)).unsqueeze(-1)  # (K, B), (K, B, 1)


@torch.no_grad()
def iwae_log_likelihood(
    model: LatentVariableModel,
    x: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    chunk: int = DECODE_ROWS,
) -> torch.Tensor:
    """Importance-weighted estimate of log p(x) per image: x (N, C, H, W) -> (N,) float64.

    L_K = logsumexp_k(log w_k) - log K with K = ``k`` samples from q(z|x) (Burda et al. 2016).
    Its expectation is a lower bound on log p(x) that rises with K; with q equal to the exact
    posterior every w_k equals p(x) and the estimate is exact for any K. All N images' noise is
    drawn at once, (K, N, D); the decoder sees at most max(``chunk``, N) latent vectors a call.
    """
    if k < 1:
        raise ValueError(f"k: expected at least 1 importance sample, got {k}")
    ll, log_ratio = _log_weights(model, x, model.encode(x), k, generator, chunk)  # (K, N)
    return torch.logsumexp(ll + log_ratio.sum(-1), 0) - math.log(k)


@torch.no_grad()
def active_units(
    model: LatentVariableModel, x_all: torch.Tensor, batch_size: int, threshold: float = 0.01
) -> tuple[int, torch.Tensor]:
    """Count the latent units in use (Burda et al. 2016, section 5.2).

    Unit u is active when A_u = Cov_x(E_q[z_u|x]) > ``threshold``: the posterior mean of u moves
    with the input. With two layers, a unit of the lower layer is measured against what the
    top layer already says of it: A_u = Cov_x(E_q[z1_u | x, m2] - E_p[z1_u | m2]) at m2 =
    E q(z2|x), so a z1 that only copies p(z1|z2) counts as inactive however its mean moves.
    x_all (N, C, H, W) is encoded ``batch_size`` images at a time. Returns the count and the
    variances A_u, (D,) float64 (population variance over the N images).
    """
    prior = None  # p(z1|z2), built once when there are two layers
    mus = []
    for i in range(0, len(x_all), batch_size):
        q = model.encode(x_all[i : i + batch_size])
        mu = q.mean  # (B, D)
        if isinstance(q, HierarchicalPosterior):
            prior = model.prior() if prior is None else prior
            assert isinstance(prior, HierarchicalPrior)
            m2 = q.top.mean  # (B, D2)
            mu = torch.cat([mu[:, : -m2.shape[-1]] - prior.lower(m2).mean, m2], dim=-1)
        mus.append(mu)
    variances = torch.cat(mus).double().var(0, unbiased=False)  # (D,)
    return int((variances > threshold).sum()), variances


@torch.no_grad()
def evaluate(model: VAE, x_all: torch.Tensor, cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate on the test images x_all (N, C, H, W), floats in [0, 1] on the model's device
    (on their first ``cfg.max_images`` only, when it is set).

    Returns the metrics dict (JSON-ready Python numbers). Values are nats per image, means over
    the N images:

    - ``elbo``: mean of log w_k over the K = ``iw_samples`` importance samples; ``kl`` is
      KL(q(z|x) || N(0, I)) in closed form (for the VampPrior, the K-sample Monte Carlo estimate
      of KL(q || p); ``kl_estimator`` says which) and ``recon`` = -elbo - kl, E_q[-log p(x|z)].
    - ``nll_iw``: -L_K, the importance-weighted estimate of -log p(x) from the same samples;
      ``elbo_gap`` = -elbo - nll_iw >= 0.
    - ``bits_per_dim``: nll_iw / (D ln 2), D = C*H*W pixel values. For a Gaussian decoder, whose
      density is over continuous [0, 1], the 8-bit discretisation term D ln 256 is added first:
      (nll_iw + D ln 256) / (D ln 2), the cost of coding 256-level pixels in bins of width 1/256.
    - ``active_units`` (count, ``active_unit_threshold``) and ``kl_per_dim`` (D_latent floats,
      closed-form KL per latent unit; they sum to ``kl``; null for the VampPrior and for two
      layers).
    - ``kl_per_layer`` and ``active_units_per_layer`` (``model.latent_layers: 2``): [z1, z2],
      bottom layer first; the KL terms E[log q(z1|x,z2) - log p(z1|z2)] and
      E[log q(z2|x) - log p(z2)], Monte Carlo over the K samples, sum to ``kl``; a lower-layer
      unit is active by what it adds to p(z1|z2) (:func:`active_units`). Null for one layer.
    - ``n_images``, ``iw_samples``, ``seconds`` (wall time) and ``images_x_samples_per_second``.
    """
    if cfg.max_images:  # a fixed subset: the split's first images, whatever the seed
        x_all = x_all[: cfg.max_images]
    with eval_mode(model):
        t0 = time.perf_counter()
        gen = torch.Generator(device=x_all.device).manual_seed(cfg.seed)
        n, k = x_all.shape[0], cfg.iw_samples
        # sums of log p(x), the ELBO and the Monte Carlo KL, over the images
        layers = model.cfg.latent_layers
        sums = torch.zeros(2 + layers, dtype=torch.float64, device=x_all.device)
        kl_dim = torch.zeros(model.code_dim, dtype=torch.float64, device=x_all.device)
        prior = model.prior()
        closed = prior.closed_form_kl
        for i in range(0, n, cfg.batch_size):
            x = x_all[i : i + cfg.batch_size]
            q = model.encode(x)
            ll, ratios = _log_weights(model, x, q, k, gen, DECODE_ROWS, prior)  # (K, B, L)
            log_w = ll + ratios.sum(-1)  # (K, B)
            log_px = torch.logsumexp(log_w, 0) - math.log(k)  # (B,)
            kl_layers = -ratios.mean(0).sum(0)  # (L,): Monte Carlo KL sums per layer
            sums += torch.cat([torch.stack([log_px.sum(), log_w.mean(0).sum()]), kl_layers])
            if closed:
                kl_dim += q.kl_per_dim().double().sum(0)
        n_active, variances = active_units(model, x_all, cfg.batch_size, cfg.active_unit_threshold)

    log_px, elbo, *kl_mc = (sums / n).tolist()  # the one sync
    kl_per_dim = (kl_dim / n).tolist() if closed else None  # a mixture prior has no per-unit KL
    kl = math.fsum(kl_per_dim) if kl_per_dim is not None else math.fsum(kl_mc)
    per_layer = variances.chunk(layers) if layers > 1 else ()
    nll = -log_px
    d = math.prod(x_all.shape[1:])
    nll_bits = nll + d * math.log(256.0) if model.cfg.likelihood == "gaussian" else nll
    seconds = time.perf_counter() - t0
    return {
        "elbo": elbo,
        "recon": -elbo - kl,
        "kl": kl,
        "kl_estimator": "closed_form" if closed else f"monte_carlo_{k}_samples",
        "nll_iw": nll,
        "iw_samples": k,
        # >= 0 per image by Jensen; max() only absorbs float rounding when K = 1 (gap exactly 0).
        "elbo_gap": max(0.0, -elbo - nll),
        "bits_per_dim": nll_bits / (d * math.log(2.0)),
        "active_units": n_active,
        "kl_per_dim": kl_per_dim,
        # two layers: [z1 (bottom), z2 (top)], Monte Carlo estimates; null for one layer
        "kl_per_layer": kl_mc if layers > 1 else None,
        "active_units_per_layer": [int((v > cfg.active_unit_threshold).sum()) for v in per_layer]
        or None,
        "n_images": n,
        "seconds": seconds,
        "images_x_samples_per_second": n * k / seconds,
    }
