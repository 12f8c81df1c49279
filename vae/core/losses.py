"""The training objective, as pure functions.

Reduction rule (the only one in this project): **sum over pixels and latent dimensions, mean
over the batch**. Every value is therefore in nats per image.

    loss = recon + kl_weight * KL_fb        (what the optimiser minimises)
    elbo = -(recon + KL)                     (the true bound, never weighted or floored)

where recon = E_q[-log p(x|z)] (a one-sample estimate), KL = KL(q(z|x) || N(0, I)) in closed
form (for the VampPrior, which has none, the one-sample estimate log q(z|x) - log p(z) at the
decoded z), and KL_fb is KL with free bits (Kingma et al. 2016): each latent dimension's
batch-mean KL is floored at ``free_bits`` nats, so the optimiser gains nothing by pushing a
unit below it. Where the KL has no closed form (the VampPrior, two layers), free bits work by
groups, as in Kingma et al.: each stochastic layer's batch-mean Monte Carlo KL is floored at
its ``free_bits`` times its width, so a layer keeps that many nats before the KL weight can
push it down.

``train.objective: iwae`` minimises instead -L_K, the importance-weighted bound of Burda et al.
(2016) with K = ``train.iw_k`` samples per image: L_K = log (1/K) sum_k w_k, with
log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x). L_1 is the ELBO, and L_K rises towards
log p(x) as K grows, so the model is trained on a tighter bound than the ELBO. A KL warm-up
weight w < 1 anneals the weights instead, log w_k = log p(x|z_k) + w (log p(z_k) - log q(z_k|x)),
so the objective is L_K itself once the warm-up ends (with K = 1, it is the weighted ELBO).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from vae.core.hierarchy import HierarchicalPrior
from vae.core.model import VAEOutput

__all__ = [
    "LossTerms",
    "iwae_bound",
    "kl_per_layer",
    "kl_weight",
    "negative_elbo",
    "objective_terms",
]


class LossTerms(NamedTuple):
    loss: torch.Tensor  # scalar to minimise
    elbo: torch.Tensor  # scalar, nats per image
    recon: torch.Tensor  # scalar, nats per image
    kl: torch.Tensor  # scalar, nats per image


def negative_elbo(
    x: torch.Tensor,
    out: VAEOutput,
    kl_weight: float = 1.0,
    free_bits: float | tuple[float, ...] = 0.0,
) -> LossTerms:
    """-ELBO terms; ``free_bits`` in nats per latent dimension, one number or one per layer."""
    recon = -out.likelihood.log_prob(x).mean()  # (B,) -> ()
    if not out.prior.closed_form_kl:  # one-sample Monte Carlo KL at the z that was decoded
        kl_layers = kl_per_layer(out).mean(0)  # (L,)
        kl = kl_layers.sum()
        floors = _per_layer(free_bits, kl_layers.shape[0])
        if not any(floors):
            return LossTerms(recon + kl_weight * kl, -(recon + kl), recon, kl)
        width = out.z.shape[-1] // kl_layers.shape[0]  # latent dimensions per layer
        floor = torch.tensor(floors, dtype=kl.dtype, device=kl.device) * width
        return LossTerms(
            recon + kl_weight * torch.maximum(kl_layers, floor).sum(), -(recon + kl), recon, kl
        )
    kl_bd = out.posterior.kl_per_dim()  # (B, D)
    kl = kl_bd.sum(-1).mean()
    (fb,) = _per_layer(free_bits, 1)
    kl_term = kl_bd.mean(0).clamp(min=fb).sum() if fb > 0 else kl
    return LossTerms(recon + kl_weight * kl_term, -(recon + kl), recon, kl)


def kl_per_layer(out: VAEOutput) -> torch.Tensor:
    """The one-sample Monte Carlo KL of each stochastic layer at the decoded z, (B, L): log q -
    log p per layer, bottom first (L = 1 for one layer); the columns sum to the KL estimate."""
    if isinstance(out.prior, HierarchicalPrior):
        return out.posterior.log_prob_layers(out.z) - out.prior.log_prob_layers(out.z)
    return (out.posterior.log_prob(out.z) - out.prior.log_prob(out.z)).unsqueeze(-1)


def _per_layer(free_bits: float | tuple[float, ...], layers: int) -> tuple[float, ...]:
    if isinstance(free_bits, tuple):
        if len(free_bits) != layers:
            raise ValueError(f"free_bits: {len(free_bits)} values for {layers} layer(s)")
        return free_bits
    return (free_bits,) * layers


def iwae_bound(x: torch.Tensor, out: VAEOutput, kl_weight: float = 1.0) -> LossTerms:
    """-L_K for ``out = model(x, eps=eps)`` with eps of shape (K, B, D): K samples per image.

    ``loss`` is -L_K (its weights annealed by ``kl_weight`` < 1 during a warm-up); ``elbo`` is
    the mean of the unannealed log w_k (the K-sample Monte Carlo ELBO), ``recon`` the mean of
    -log p(x|z_k), and ``kl`` the KL, so the rows stay comparable with those of the ELBO
    objective.
    """
    if out.z.dim() != 3:
        raise ValueError(f"iwae_bound needs z of shape (K, B, D), got {tuple(out.z.shape)}")
    log_px_z = out.likelihood.log_prob(x)  # (K, B)
    log_ratio = out.prior.log_prob(out.z) - out.posterior.log_prob(out.z)  # (K, B)
    log_w = log_px_z + kl_weight * log_ratio
    bound = (torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])).mean()
    kl = -log_ratio.mean() if not out.prior.closed_form_kl else out.posterior.kl().mean()
    return LossTerms(-bound, (log_px_z + log_ratio).mean(), -log_px_z.mean(), kl)


def objective_terms(
    x: torch.Tensor,
    out: VAEOutput,
    objective: str,
    kl_weight: float = 1.0,
    free_bits: float | tuple[float, ...] = 0.0,
) -> LossTerms:
    """The terms of ``train.objective`` (``elbo`` or ``iwae``); free bits apply to the ELBO."""
    if objective == "iwae":
        return iwae_bound(x, out, kl_weight)
    return negative_elbo(x, out, kl_weight, free_bits)


def kl_weight(step: int, warmup_steps: int, beta: float = 1.0) -> float:
    """Linear KL warm-up: 0 at step 0, ``beta`` from step ``warmup_steps`` on."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, max(step, 0) / warmup_steps)
