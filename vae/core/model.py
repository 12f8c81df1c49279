"""The VAE: an encoder to q(z|x), a decoder to p(x|z), and the prior p(z): N(0, I) or the
VampPrior, over one stochastic layer or two (``model.latent_layers``, vae/core/hierarchy.py).

The model is pure: ``forward`` computes no loss, does no IO and logs nothing. Randomness comes
only from an explicit ``torch.Generator`` so results are reproducible.

The default (params.yaml) is the gated MLP of the VampPrior and Exemplar VAE papers, 784-300-300
each way with latent_dim 40. On Fashion-MNIST such a model uses only part of its units actively
(``active_units`` in metrics/eval.json reports it); unused dimensions collapse to the prior and
cost nothing in nats.

Plain and convolutional layers use leaky ReLU (slope 0.1) by default (``model.activation``; a
gated layer needs none): with plain ReLU most encoder units stop firing for every input early in
training and never recover, and leaky ReLU costs the same. The figures are in
benchmarks/README.md ("Figures behind the code's choices").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from vae.config import ModelConfig
from vae.core.distributions import (
    BernoulliLikelihood,
    DiagonalGaussian,
    GaussianLikelihood,
    Likelihood,
    Prior,
    StandardNormal,
    VampPrior,
)
from vae.core.gated_conv import GatedConvDecoder, GatedConvEncoder
from vae.core.hierarchy import (
    PAPER_LOGVAR,
    WIDE_LOGVAR,
    HierarchicalPosterior,
    HierarchicalPrior,
    LowerLayer,
    Posterior,
    SharedTopDown,
    TopDown,
)
from vae.core.layers import Encoder, SequentialEncoder, activation, mlp_layers
from vae.core.resnet import ResNetDecoder, ResNetEncoder

__all__ = ["VAE", "VAEOutput", "embed", "eval_mode"]

if TYPE_CHECKING:
    from vae.core.sampler import LatentDensity


@dataclass
class VAEOutput:
    posterior: Posterior  # q(z|x), batch (B, D)
    likelihood: Likelihood  # p(x|z), batch (B, C, H, W)
    z: torch.Tensor  # (B, D) or (K, B, D): the reparameterised samples the likelihood decoded
    prior: Prior | HierarchicalPrior  # p(z)


class _MLPEncoder(SequentialEncoder):
    def __init__(
        self, in_features: int, hidden: int, latent: int, act: str, layers: int = 1, gated=False
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), *mlp_layers(in_features, hidden, layers, 2 * latent, act, gated)
        )


class _MLPDecoder(nn.Module):
    def __init__(
        self, latent: int, hidden: int, out_shape: tuple[int, ...], act: str, layers=1, gated=False
    ) -> None:
        super().__init__()
        self.out_shape = out_shape
        self.net = nn.Sequential(
            *mlp_layers(latent, hidden, layers, math.prod(out_shape), act, gated)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).unflatten(-1, self.out_shape)


class _ConvEncoder(SequentialEncoder):
    """(B, C, H, W) -> two stride-2 convs -> (B, 2c, H/4, W/4) -> linear layers."""

    def __init__(self, shape: tuple[int, ...], c: int, hidden: int, latent: int, act: str) -> None:
        super().__init__()
        ch, h, w = shape
        self.net = nn.Sequential(
            nn.Conv2d(ch, c, 4, 2, 1),
            activation(act),
            nn.Conv2d(c, 2 * c, 4, 2, 1),
            activation(act),
            nn.Flatten(),
            nn.Linear(2 * c * (h // 4) * (w // 4), hidden),
            activation(act),
            nn.Linear(hidden, 2 * latent),
        )


class _ConvDecoder(nn.Module):
    def __init__(self, shape: tuple[int, ...], c: int, hidden: int, latent: int, act: str) -> None:
        super().__init__()
        ch, h, w = shape
        self.net = nn.Sequential(
            nn.Linear(latent, hidden),
            activation(act),
            nn.Linear(hidden, 2 * c * (h // 4) * (w // 4)),
            activation(act),
            nn.Unflatten(-1, (2 * c, h // 4, w // 4)),
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1),
            activation(act),
            nn.ConvTranspose2d(c, ch, 4, 2, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VAE(nn.Module):
    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int] = (1, 28, 28)) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        self.code_dim = cfg.code_dim  # the width of z, all stochastic layers together
        d, z = cfg.latent_dim, cfg.code_dim  # the encoder's head gives the top layer only
        if cfg.arch in ("mlp", "gated_mlp"):
            deep = {"layers": cfg.hidden_layers, "gated": cfg.arch == "gated_mlp"}
            n_in = math.prod(image_shape)
            self.encoder: Encoder = _MLPEncoder(n_in, cfg.hidden_dim, d, cfg.activation, **deep)
            self.decoder: nn.Module = _MLPDecoder(
                z, cfg.hidden_dim, self.image_shape, cfg.activation, **deep
            )
        elif cfg.arch == "resnet":
            sizes = (self.image_shape, cfg.conv_channels, cfg.hidden_dim)
            self.encoder = ResNetEncoder(*sizes, d, cfg.activation)
            self.decoder = ResNetDecoder(*sizes, z, cfg.activation)
        else:
            if image_shape[1] % 4 or image_shape[2] % 4:
                raise ValueError(
                    f"model.arch: {cfg.arch!r} needs height and width divisible by 4, "
                    f"got {image_shape[1:]}"
                )
            sizes = (self.image_shape, cfg.conv_channels, cfg.hidden_dim)
            if cfg.arch == "gated_conv":
                self.encoder = GatedConvEncoder(self.image_shape, cfg.conv_channels, d)
                self.decoder = GatedConvDecoder(*sizes, d, cfg.latent_layers)
            else:
                self.encoder = _ConvEncoder(*sizes, d, cfg.activation)
                self.decoder = _ConvDecoder(*sizes, z, cfg.activation)
        if cfg.latent_layers == 2:
            self.top_down = self._top_down(cfg)
        if cfg.likelihood == "gaussian":
            shape = self.image_shape if cfg.gaussian_variance == "per_pixel" else (1, 1, 1)
            self.decoder_logvar = nn.Parameter(torch.zeros(shape))
        if cfg.prior == "vamp":  # pseudo-input logits; sigmoid(-1) ~ 0.27, a mean pixel
            self.pseudo_inputs = nn.Parameter(
                torch.randn(cfg.pseudo_inputs, *self.image_shape) * 0.1 - 1.0
            )
        # Where generate() draws z: None is the prior p(z); a density fitted to the training
        # codes after training (vae.core.sampler) is not a weight, so it is not in the state dict.
        self.latent_sampler: LatentDensity | None = None

    def __setattr__(self, name: str, value: object) -> None:
        if name == "latent_sampler":  # not a submodule: its weights are not the VAE's
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _top_down(self, cfg: ModelConfig) -> LowerLayer:
        """The lower layer's conditionals q(z1|x, z2) and p(z1|z2) (vae/core/hierarchy.py)."""
        gated = cfg.arch in ("gated_mlp", "gated_conv")
        d, act, bound = cfg.latent_dim, cfg.activation, cfg.mean_bound
        if cfg.lower_inference == "branch":
            return TopDown(math.prod(self.image_shape), d, cfg.hidden_dim, act, gated, bound)
        features = getattr(self.encoder, "feature_dim", cfg.hidden_dim)  # the head's input
        return SharedTopDown(features, d, cfg.hidden_dim, act, gated, bound)

    def encode(self, x: torch.Tensor) -> Posterior:
        """x (B, C, H, W) in [0, 1] -> q(z|x); with two layers, q(z2|x) q(z1|x, z2)."""
        h = self.encoder.features(x)  # (B, F): the features under the head
        top = self._top_gaussian(self.encoder.head(h))  # (B, D)
        if self.cfg.latent_layers == 1:
            return top
        return HierarchicalPosterior(top, self.top_down.features(x, h), self.top_down.posterior)

    def _encode_top(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z2|x) alone (q(z|x) for one layer): what the VampPrior's pseudo-inputs need."""
        return self._top_gaussian(self.encoder(x))

    def _top_gaussian(self, head: torch.Tensor) -> DiagonalGaussian:
        """The encoder head's (B, 2D) as q(z|x), or q(z2|x); the paper's two-layer layout bounds
        its log-variance as it does its other Gaussians'."""
        mean, logvar = head.float().chunk(2, dim=-1)
        paper = self.cfg.latent_layers == 2 and self.cfg.lower_inference == "branch"
        logvar_range = PAPER_LOGVAR if paper else WIDE_LOGVAR
        return DiagonalGaussian(mean, logvar, logvar_range, self.cfg.mean_bound)

    def prior(self) -> Prior | HierarchicalPrior:
        """p(z): N(0, I), or the VampPrior of the learned pseudo-inputs (``model.prior``); with
        two layers that is p(z2), and p(z1|z2) is learned."""
        if self.cfg.prior == "standard":
            top: Prior = StandardNormal(self.cfg.latent_dim)
        else:
            top = VampPrior(self._encode_top(torch.sigmoid(self.pseudo_inputs)))
        if self.cfg.latent_layers == 1:
            return top
        return HierarchicalPrior(top, self.top_down.prior)

    def decode(self, z: torch.Tensor) -> Likelihood:
        """z (..., D) -> p(x|z) over images (..., C, H, W); leading dims are flattened through."""
        lead = z.shape[:-1]
        h = self.decoder(z.reshape(-1, z.shape[-1])).float()
        h = h.reshape(*lead, *self.image_shape)
        if self.cfg.likelihood == "bernoulli":
            return BernoulliLikelihood(h)
        return GaussianLikelihood(torch.sigmoid(h), self.decoder_logvar)

    def forward(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
    ) -> VAEOutput:
        """Encode, draw z = mean + std * eps (eps from ``generator``, or given), decode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if eps is None else posterior.reparam(eps)
        return VAEOutput(posterior, self.decode(z), z, self.prior())

    @torch.no_grad()
    def generate(
        self, n: int, generator: torch.Generator | None = None, mean: bool = True
    ) -> torch.Tensor:
        """Decode n draws of z (:meth:`sample_latents`); the decoder's mean, or a sample of it."""
        px = self.decode(self.sample_latents(n, generator))
        return px.mean if mean else px.sample(generator)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, D) draws from ``latent_sampler``, or from the prior N(0, I) when it is None."""
        device = next(self.parameters()).device
        if self.latent_sampler is not None:
            return self.latent_sampler.sample(n, generator).to(device)
        return self.prior().sample(n, generator, device)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then the mode it had before (training or not)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def embed(model: VAE, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and log-variance of q(z|x) for float images (N, C, H, W) in [0, 1].

    Returns ``(mu, logvar)``, each (N, D) float32 on the CPU. Batches of ``batch_size`` are
    moved to the model's device one at a time, so ``images`` may live on the CPU.
    """
    device = next(model.parameters()).device
    mus, logvars = [], []
    with eval_mode(model):
        for i in range(0, images.shape[0], batch_size):
            q = model.encode(images[i : i + batch_size].to(device))
            mus.append(q.mean.float().cpu())  # (B, D)
            logvars.append(q.logvar.float().cpu())  # (B, D)
    if not mus:
        return torch.empty(0, model.code_dim), torch.empty(0, model.code_dim)
    return torch.cat(mus), torch.cat(logvars)
