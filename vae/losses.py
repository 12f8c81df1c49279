"""The training objective, as pure functions.

Reduction rule (the only one in this project): **sum over pixels and latent dimensions, mean
over the batch**. Every value is therefore in nats per image.

    loss = recon + kl_weight * KL_fb        (what the optimiser minimises)
    elbo = -(recon + KL)                     (the true bound, never weighted or floored)

where recon = E_q[-log p(x|z)] (a one-sample estimate), KL = KL(q(z|x) || N(0, I)) in closed
form, and KL_fb is KL with free bits (Kingma et al. 2016): each latent dimension's batch-mean KL
is floored at ``free_bits`` nats, so the optimiser gains nothing by pushing a unit below it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vae.model import VAEOutput

__all__ = ["LossTerms", "kl_weight", "negative_elbo"]


class LossTerms(NamedTuple):
    loss: torch.Tensor  # scalar to minimise
    elbo: torch.Tensor  # scalar, nats per image
    recon: torch.Tensor  # scalar, nats per image
    kl: torch.Tensor  # scalar, nats per image


def negative_elbo(
    x: torch.Tensor, out: VAEOutput, kl_weight: float = 1.0, free_bits: float = 0.0
) -> LossTerms:
    recon = -out.likelihood.log_prob(x).mean()  # (B,) -> ()
    kl_bd = out.posterior.kl_per_dim()  # (B, D)
    kl = kl_bd.sum(-1).mean()
    kl_term = kl_bd.mean(0).clamp(min=free_bits).sum() if free_bits > 0 else kl
    return LossTerms(recon + kl_weight * kl_term, -(recon + kl), recon, kl)


def kl_weight(step: int, warmup_steps: int, beta: float = 1.0) -> float:
    """Linear KL warm-up: 0 at step 0, ``beta`` from step ``warmup_steps`` on."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, max(step, 0) / warmup_steps)
