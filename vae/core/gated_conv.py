"""The gated convolutional encoder and decoder of the VampPrior paper's ConvHVAE (Tomczak &
Welling 2018, appendix; ``model.arch: gated_conv``), ``model.conv_channels`` (c) wide:

    q(z2|x)   5 gated convolutions, 1 -> c (7x7) -> c (3x3, stride 2) -> 2c (5x5) -> 2c (3x3,
              stride 2) -> 6 channels at H/4 x W/4, flattened (294 values at 28 x 28), then the
              Gaussian's head
    p(x|z)    each stochastic layer through a gated dense layer of ``hidden_dim`` units, joined
              by a gated dense layer to an image-sized map, then 4 gated 3x3 convolutions of 2c
              channels at full resolution and a 1x1 convolution to the pixels' logits

With two layers, q(z1|x, z2) is dense (vae/core/hierarchy.py). A gated convolution is
conv_h(x) * sigmoid(conv_g(x)) (Dauphin et al. 2017), as the gated dense layer. At 28 x 28 a
decoder pass is about 2 x 10^8 multiply-adds per image, some 200 times the gated MLP's: this
architecture is for a GPU (docs/gpu.md).

Only torch and the other shipped modules are imported: this module ships inside registered
models.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vae.core.layers import Gated, SequentialEncoder

__all__ = ["GatedConv2d", "GatedConvDecoder", "GatedConvEncoder"]


class GatedConv2d(nn.Module):
    """h = conv_h(x) * sigmoid(conv_g(x)), padded to keep H x W at stride 1."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        pad = kernel // 2
        self.h = nn.Conv2d(c_in, c_out, kernel, stride, pad)
        self.g = nn.Conv2d(c_in, c_out, kernel, stride, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Gated.gate(self.h(x), self.g(x))


class GatedConvEncoder(SequentialEncoder):
    """(B, C, H, W) -> (B, 6 * H/4 * W/4) features -> (B, 2 * latent), H and W divisible by 4."""

    def __init__(self, shape: tuple[int, ...], c: int, latent: int) -> None:
        super().__init__()
        ch, h, w = shape
        self.feature_dim = 6 * (h // 4) * (w // 4)
        self.net = nn.Sequential(
            GatedConv2d(ch, c, 7),
            GatedConv2d(c, c, 3, 2),
            GatedConv2d(c, 2 * c, 5),
            GatedConv2d(2 * c, 2 * c, 3, 2),
            GatedConv2d(2 * c, 6, 3),
            nn.Flatten(),
            nn.Linear(self.feature_dim, 2 * latent),
        )


class GatedConvDecoder(nn.Module):
    """z (N, layers * latent), bottom layer first -> logits (N, C, H, W)."""

    def __init__(self, shape: tuple[int, ...], c: int, hidden: int, latent: int, layers: int):
        super().__init__()
        self.shape, self.latent = tuple(shape), latent
        self.branches = nn.ModuleList(Gated(latent, hidden) for _ in range(layers))
        self.joint = Gated(layers * hidden, math.prod(shape))
        self.convs = nn.Sequential(
            GatedConv2d(shape[0], 2 * c, 3),
            *(GatedConv2d(2 * c, 2 * c, 3) for _ in range(3)),
            nn.Conv2d(2 * c, shape[0], 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        parts = z.split(self.latent, dim=-1)  # [z1, z2] (N, latent) each
        h = torch.cat([branch(p) for branch, p in zip(self.branches, parts, strict=True)], -1)
        return self.convs(self.joint(h).unflatten(-1, self.shape))  # (N, C, H, W)
