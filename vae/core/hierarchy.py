"""Two stochastic layers (``model.latent_layers: 2``), top-down as in the hierarchical VAEs of
the VampPrior paper (Tomczak & Welling 2018, section 3.3) and ladder VAEs (Sønderby et al. 2016).

    inference   q(z2 | x) q(z1 | x, z2)       generative   p(z2) p(z1 | z2) p(x | z1, z2)

z2 is the top layer: the encoder's head gives q(z2|x), and its prior p(z2) is ``model.prior``
(N(0, I), or the VampPrior of the pseudo-inputs' q(z2|u)). z1 is inferred from x, through a branch
of its own, and z2; p(z1|z2) has two hidden layers; the decoder reads both layers
(``TopDown``; the first design, ``SharedTopDown``, read the encoder's features). The model hands
the rest of the project one code, z = [z1, z2] of ``VAE.code_dim`` = 2 x ``model.latent_dim``
values, and two objects with the interface of the one-layer posterior and prior (``sample``,
``log_prob``, ``mean``, ``logvar``),
so the ELBO, the IWAE bound, the evaluation, the samplers and the registered model need nothing
of their own. Neither KL term has a closed form once z2 is sampled, so the ELBO's KL is the
one-sample Monte Carlo estimate log q(z|x) - log p(z), as for the VampPrior.

The code's ``mean`` (the embedding ``encode`` returns) is [E q(z1 | x, z2 = m2), m2] with m2 =
E q(z2|x): both layers, bottom first.

Only torch and the other shipped modules are imported: this module ships inside registered
models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from vae.core.distributions import DiagonalGaussian, Prior
from vae.core.layers import Gated, activation, mlp_layers

__all__ = [
    "PAPER_LOGVAR",
    "WIDE_LOGVAR",
    "HierarchicalPosterior",
    "HierarchicalPrior",
    "LowerLayer",
    "Posterior",
    "SharedTopDown",
    "TopDown",
]

Conditional = Callable[..., DiagonalGaussian]


# The log-variances of every Gaussian of the paper's two-layer layout, as its code bounds them
# (a hardtanh): std in [0.05, 2.7]. With the wide default a training image's q(z2|x) reached
# logvar 20 (std 22,000; a clamp passes no gradient back) in one seed of the hvae preset, and
# p(z1|z2) at those z2 gave a KL of 10^24 nats at every epoch after.
PAPER_LOGVAR = (-6.0, 2.0)
WIDE_LOGVAR = (-30.0, 20.0)  # every other Gaussian's, and the first design's


def _gaussian(
    h: torch.Tensor, logvar_range: tuple[float, float] = PAPER_LOGVAR, mean_bound: float = 0.0
) -> DiagonalGaussian:
    mean, logvar = h.float().chunk(2, dim=-1)
    return DiagonalGaussian(mean, logvar, logvar_range, mean_bound)


def _unit(n_in: int, n_out: int, act: str, gated: bool) -> nn.Module:
    """One hidden layer: gated (``gated_mlp``, ``gated_conv``), or dense + the activation."""
    return Gated(n_in, n_out) if gated else nn.Sequential(nn.Linear(n_in, n_out), activation(act))


class LowerLayer(nn.Module):
    """The lower layer's two conditionals, q(z1 | x, z2) and p(z1 | z2)."""

    p_net: nn.Sequential

    def __init__(self, mean_bound: float = 0.0) -> None:
        super().__init__()
        self.mean_bound = mean_bound  # ``model.mean_bound``: soft bound on both conditionals' means

    def features(self, x: torch.Tensor, encoder_features: torch.Tensor) -> torch.Tensor:
        """What q(z1|x, z2) reads of x, (B, F), from the images and the encoder's features."""
        raise NotImplementedError

    def posterior(self, h: torch.Tensor, z2: torch.Tensor) -> DiagonalGaussian:
        """q(z1 | x, z2): h (..., F) from :meth:`features`, z2 (..., D), same leading dims."""
        raise NotImplementedError

    def prior(self, z2: torch.Tensor) -> DiagonalGaussian:
        """p(z1 | z2) for z2 (..., D)."""
        # The evaluation's codes are float64 (vae.evaluation.evaluate); the network runs in its own
        # dtype.
        h = self.p_net(z2.to(next(self.p_net.parameters()).dtype))
        return _gaussian(h, mean_bound=self.mean_bound)


class TopDown(LowerLayer):
    """The conditionals as the VampPrior paper's HVAE builds them (``model.lower_inference:
    branch``):

    - q(z1 | x, z2): x through a branch of its own (one hidden layer over the pixels), z2
      through one hidden layer, the two joined by a third, then the Gaussian's head;
    - p(z1 | z2): two hidden layers, then the head.

    Every hidden layer is ``hidden`` wide, gated for the gated architectures.
    """

    def __init__(
        self, pixels: int, latent: int, hidden: int, act: str, gated: bool, mean_bound: float = 0.0
    ) -> None:
        super().__init__(mean_bound)
        self.q_x = nn.Sequential(nn.Flatten(), _unit(pixels, hidden, act, gated))
        self.q_z2 = _unit(latent, hidden, act, gated)
        self.q_joint = nn.Sequential(
            _unit(2 * hidden, hidden, act, gated), nn.Linear(hidden, 2 * latent)
        )
        self.p_net = nn.Sequential(*mlp_layers(latent, hidden, 2, 2 * latent, act, gated))

    def _joint_linears(self) -> tuple[nn.Linear, ...]:
        """The joint layer's linear maps of [x's features, z2's]: (h, g) gated, else one."""
        unit = self.q_joint[0]
        return (unit.h, unit.g) if isinstance(unit, Gated) else (unit[0],)

    def features(self, x: torch.Tensor, encoder_features: torch.Tensor) -> torch.Tensor:
        """The joint layer's x half, W_x q_x(x) + b for each of its linear maps, (B, 2 hidden)
        gated: W [hx; hz] + b = (W_x hx + b) + W_z hz, so the K draws of z2 pay for W_z hz only."""
        hx = self.q_x(x)
        width = hx.shape[-1]
        return torch.cat(
            [F.linear(hx, m.weight[:, :width], m.bias) for m in self._joint_linears()], -1
        )

    def posterior(self, h: torch.Tensor, z2: torch.Tensor) -> DiagonalGaussian:
        unit, maps = self.q_joint[0], self._joint_linears()
        hz = self.q_z2(z2.to(h.dtype))
        width = hz.shape[-1]
        pre = [
            x_half + F.linear(hz, m.weight[:, width:])
            for x_half, m in zip(h.chunk(len(maps), -1), maps, strict=True)
        ]
        hidden = Gated.gate(*pre) if isinstance(unit, Gated) else unit[1](*pre)
        return _gaussian(self.q_joint[1](hidden), mean_bound=self.mean_bound)


class SharedTopDown(LowerLayer):
    """The first two-layer design (``model.lower_inference: shared``, what models saved before
    the key meant): q(z1 | h(x), z2) reads the encoder's last hidden features, and both
    conditionals have one hidden layer. Its lower layer collapsed (docs/models.md); it stays so
    those models load."""

    def __init__(
        self,
        features: int,
        latent: int,
        hidden: int,
        act: str,
        gated: bool,
        mean_bound: float = 0.0,
    ) -> None:
        super().__init__(mean_bound)
        self.q_net = nn.Sequential(
            *mlp_layers(features + latent, hidden, 1, 2 * latent, act, gated)
        )
        self.p_net = nn.Sequential(*mlp_layers(latent, hidden, 1, 2 * latent, act, gated))

    def features(self, x: torch.Tensor, encoder_features: torch.Tensor) -> torch.Tensor:
        return encoder_features

    def posterior(self, h: torch.Tensor, z2: torch.Tensor) -> DiagonalGaussian:
        out = self.q_net(torch.cat([h, z2.to(h.dtype)], dim=-1))
        return _gaussian(out, WIDE_LOGVAR, self.mean_bound)

    def prior(self, z2: torch.Tensor) -> DiagonalGaussian:
        h = self.p_net(z2.to(next(self.p_net.parameters()).dtype))
        return _gaussian(h, WIDE_LOGVAR, self.mean_bound)


def _split(z: torch.Tensor, d1: int) -> tuple[torch.Tensor, torch.Tensor]:
    return z[..., :d1], z[..., d1:]


class HierarchicalPosterior:
    """q(z|x) = q(z2|x) q(z1|x, z2) over z = [z1, z2], batch (B, D1 + D2)."""

    def __init__(self, top: DiagonalGaussian, h: torch.Tensor, lower: Conditional) -> None:
        self.top = top  # q(z2|x), (B, D2)
        self.h = h  # what q(z1|x, z2) reads of x, (B, F)
        self.lower = lower  # (h, z2) -> q(z1|x, z2)
        self._drawn: tuple[torch.Tensor, DiagonalGaussian] | None = None  # the last z, its q(z1|..)

    @functools.cached_property
    def _at_mean(self) -> DiagonalGaussian:
        """q(z1 | x, z2 = E[z2]): the lower half of the embedding; training never asks for it."""
        return self.lower(self.h, self.top.mean)

    def _lower_at(self, z2: torch.Tensor) -> DiagonalGaussian:
        return self.lower(self.h.expand(*z2.shape[:-1], self.h.shape[-1]), z2)

    @property
    def mean(self) -> torch.Tensor:
        return torch.cat([self._at_mean.mean, self.top.mean], dim=-1)

    @property
    def logvar(self) -> torch.Tensor:
        return torch.cat([self._at_mean.logvar, self.top.logvar], dim=-1)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def reparam(self, eps: torch.Tensor) -> torch.Tensor:
        """z for standard-normal noise eps (..., B, D1 + D2): z2 first, then z1 given it."""
        eps1, eps2 = _split(eps, self.top.mean.shape[-1])
        z2 = self.top.reparam(eps2)
        lower = self._lower_at(z2)
        z = torch.cat([lower.reparam(eps1), z2], dim=-1)
        self._drawn = (z, lower)  # log_prob of this z reuses q(z1|x, z2): one pass per draw
        return z

    def sample(
        self, generator: torch.Generator | None = None, n: int | None = None
    ) -> torch.Tensor:
        """Reparameterised z (B, D1 + D2), or (n, B, D1 + D2) when n is given."""
        mean = self.top.mean
        shape = (*(() if n is None else (n,)), *mean.shape[:-1], 2 * mean.shape[-1])
        eps = torch.randn(shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.reparam(eps)

    def log_prob_layers(self, z: torch.Tensor) -> torch.Tensor:
        """[log q(z1|x, z2), log q(z2|x)] for z (..., B, D1 + D2) -> (..., B, 2)."""
        z1, z2 = _split(z, self.top.mean.shape[-1])
        return torch.stack([self._lower_for(z, z2).log_prob(z1), self.top.log_prob(z2)], dim=-1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.log_prob_layers(z).sum(-1)

    def _lower_for(self, z: torch.Tensor, z2: torch.Tensor) -> DiagonalGaussian:
        """q(z1|x, z2) for z = [z1, z2]: the one computed when z was drawn, if z is that draw (the
        same tensor, or its values in another dtype, as the float64 copy the evaluation scores).
        Gradients are those of recomputing it: the reused Gaussian is a function of the same z2."""
        if self._drawn is not None:
            drawn, lower = self._drawn
            same = z is drawn or (
                z.shape == drawn.shape
                and not z.requires_grad
                and torch.equal(z.to(drawn.dtype), drawn.detach())
            )
            if same:
                return lower
        return self._lower_at(z2)


class HierarchicalPrior:
    """p(z) = p(z2) p(z1|z2) over z = [z1, z2]; p(z2) is the one-layer prior. No closed-form KL."""

    closed_form_kl = False

    def __init__(self, top: Prior, lower: Conditional) -> None:
        self.top = top
        self.lower = lower  # z2 -> p(z1|z2)

    @property
    def dim(self) -> int:
        return 2 * self.top.dim

    def log_prob_layers(self, z: torch.Tensor) -> torch.Tensor:
        """[log p(z1|z2), log p(z2)] for z (..., D1 + D2) -> (..., 2)."""
        z1, z2 = _split(z, self.top.dim)
        return torch.stack([self.lower(z2).log_prob(z1), self.top.log_prob(z2)], dim=-1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.log_prob_layers(z).sum(-1)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """(n, D1 + D2): z2 from p(z2), then z1 from p(z1|z2); each layer's noise times t."""
        z2 = self.top.sample(n, generator, device, temperature)
        eps = torch.randn(z2.shape, generator=generator, device=z2.device, dtype=z2.dtype)
        eps = temperature * eps
        return torch.cat([self.lower(z2).reparam(eps), z2], dim=-1)


Posterior = DiagonalGaussian | HierarchicalPosterior
