"""Small distribution objects the model returns: the posterior q(z|x) and the likelihood p(x|z).

Shapes: a batch of B latent vectors of size D is (B, D); K samples of it are (K, B, D). Images
are (..., C, H, W). ``log_prob`` and ``kl`` sum over the event dimensions (latent dims or
pixels) and keep the batch dimensions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "BernoulliLikelihood",
    "DiagonalGaussian",
    "GaussianLikelihood",
    "Likelihood",
    "Prior",
    "StandardNormal",
    "VampPrior",
]

LOG_2PI = math.log(2.0 * math.pi)


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))); logvar is clamped to ``logvar_range``, by default [-30, 20]
    so exp() stays finite (the two-layer model bounds it tighter, vae/core/hierarchy.py).

    With ``mean_bound`` B > 0 the mean is B * tanh(mean / B): smooth, near the identity well
    inside B, and never past it (NVAE's soft clamp; ``model.mean_bound``).
    """

    def __init__(
        self,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        logvar_range: tuple[float, float] = (-30.0, 20.0),
        mean_bound: float = 0.0,
    ) -> None:
        self.mean = mean_bound * torch.tanh(mean / mean_bound) if mean_bound > 0 else mean
        self.logvar = logvar.clamp(*logvar_range)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(
        self, generator: torch.Generator | None = None, n: int | None = None
    ) -> torch.Tensor:
        """Reparameterised sample z = mean + std * eps; (B, D), or (n, B, D) when n is given."""
        shape = self.mean.shape if n is None else (n, *self.mean.shape)
        eps = torch.randn(
            shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.reparam(eps)

    def reparam(self, eps: torch.Tensor) -> torch.Tensor:
        """z = mean + std * eps for standard-normal noise eps (..., B, D)."""
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl_per_dim(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent dimension, (B, D).

        Closed form (Kingma & Welling 2014, Appendix B): -0.5 * (1 + logvar - mean^2 - var).
        """
        return -0.5 * (1.0 + self.logvar - self.mean.pow(2) - self.logvar.exp())

    def kl(self) -> torch.Tensor:
        return self.kl_per_dim().sum(-1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (LOG_2PI + self.logvar + (z - self.mean).pow(2) / self.logvar.exp()).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


class StandardNormal:
    """The prior N(0, I) over (D,) latent vectors; its KL to a diagonal Gaussian is closed-form."""

    closed_form_kl = True

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return standard_normal_log_prob(z)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """(n, D) draws from N(0, t^2 I) at temperature t."""
        return temperature * torch.randn((n, self.dim), generator=generator, device=device)


class VampPrior:
    """p(z) = (1/K) sum_k q(z|u_k): the posteriors of K learned pseudo-inputs u_k (Tomczak &
    Welling 2018, "VAE with a VampPrior"). A mixture has no closed-form KL to q(z|x), so the
    ELBO's KL term is estimated by Monte Carlo: log q(z|x) - log p(z) at the sampled z.
    """

    closed_form_kl = False

    def __init__(self, components: DiagonalGaussian) -> None:
        self.components = components  # batch (K, D)

    @property
    def dim(self) -> int:
        return self.components.mean.shape[-1]

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) for z (..., D), returns (...) in z's dtype.

        The quadratic form is expanded into matrix products, z^2 / var - 2 z mean / var +
        mean^2 / var, so no (..., K, D) tensor is built (500 components of 500 x 100 samples
        would need gigabytes). A component whose variance has shrunk makes those terms huge and
        their difference cancels, so they are formed in float64: in float32 the difference was
        noise, and a training run diverged on it.
        """
        mean, logvar = (t.double() for t in (self.components.mean, self.components.logvar))
        z64 = z.double()
        inv = torch.exp(-logvar)  # (K, D)
        quad = z64.pow(2) @ inv.T - 2.0 * (z64 @ (mean * inv).T) + (mean.pow(2) * inv).sum(-1)
        log_n = -0.5 * (self.dim * LOG_2PI + logvar.sum(-1) + quad)  # (..., K)
        return (torch.logsumexp(log_n, -1) - math.log(mean.shape[0])).to(z.dtype)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """(n, D): a pseudo-input uniformly at random, then z from its posterior, its standard
        deviation times the temperature."""
        k = self.components.mean.shape[0]
        pick = torch.randint(k, (n,), generator=generator, device=device)
        eps = temperature * torch.randn((n, self.dim), generator=generator, device=device)
        return self.components.mean[pick] + self.components.std[pick] * eps


Prior = StandardNormal | VampPrior


class BernoulliLikelihood:
    """p(x|z) = prod_pixels Bernoulli(sigmoid(logits))."""

    def __init__(self, logits: torch.Tensor, event_ndim: int = 3) -> None:
        self.logits = logits
        self.event_ndim = event_ndim

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        ll = -F.binary_cross_entropy_with_logits(
            self.logits, x.expand_as(self.logits), reduction="none"
        )
        return ll.flatten(-self.event_ndim).sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.bernoulli(self.mean, generator=generator)


class GaussianLikelihood:
    """p(x|z) = prod_pixels N(mean, exp(logvar)); logvar is learned per pixel or shared."""

    # 8-bit pixels are 1/255 apart, so a std far below that only rewards memorising; the floor
    # exp(0.5 * -11) ~ 1/245 stops the variance of constant background pixels collapsing to 0.
    LOGVAR_MIN, LOGVAR_MAX = -11.0, 2.0

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, event_ndim: int = 3) -> None:
        self.loc = mean
        self.logvar = logvar.clamp(self.LOGVAR_MIN, self.LOGVAR_MAX).expand_as(mean)
        self.event_ndim = event_ndim

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        ll = -0.5 * (LOG_2PI + self.logvar + (x - self.loc).pow(2) / self.logvar.exp())
        return ll.flatten(-self.event_ndim).sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(
            self.loc.shape, generator=generator, device=self.loc.device, dtype=self.loc.dtype
        )
        return self.loc + torch.exp(0.5 * self.logvar) * eps


Likelihood = BernoulliLikelihood | GaussianLikelihood
