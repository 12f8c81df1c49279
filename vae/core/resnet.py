"""A residual convolutional encoder and decoder, for ``model.arch: resnet``.

Layout (c = ``channels``, n = ``blocks`` per stage, H and W divisible by 4)::

    encoder  x (B, C, H, W) -> stem 3x3 -> (c, H, W) -> down -> (2c, H/2, W/2) -> n blocks
             -> down -> (2c, H/4, W/4) -> n blocks -> act -> linear -> act -> linear (2 * latent)
    decoder  z (B, latent) -> linear -> act -> linear -> (2c, H/4, W/4) -> n blocks -> up
             -> (2c, H/2, W/2) -> n blocks -> up -> (c, H, W) -> act -> 3x3 conv -> (C, H, W)

The residual stages run at H/2 and H/4 only, the same in both halves. A stage at full resolution
would cost as much as the H/2 stage (c^2 HW MACs per conv at either) while its 3x3 convs see only
local edges, which the stem and the stride-2 convs already pick up; on a 2-core CPU that is the
difference between a cheap and an expensive model.

Design choices, each for a reason:

* **No normalisation.** BatchNorm makes ``encode(x)`` depend on the other images of the batch in
  train mode, and the posterior mean is also an embedding, so one image must map to one code
  whatever it is batched with. GroupNorm is per-sample, but it costs two extra passes over every
  activation and its groups do not divide every ``channels``. What normalisation buys a deep
  stack -- a signal that neither explodes nor vanishes at init -- the zero-initialised residual
  branches below give without it (SkipInit, De & Smith 2020; Fixup, Zhang et al. 2019). So the
  model is per-sample by construction, with no train/eval difference.
* **Zero-initialised residual branches.** The last conv of every branch starts at zero weight and
  bias, so each block is exactly the identity at init and the whole stack starts as the shallow
  stem -> down -> down -> linear net. Adam at lr 3e-3 then grows the branches from there instead of
  having to tame 2n random branches whose outputs add up on the skip path, so that the
  activations' variance grows with depth.
* **Pre-activation** (He et al. 2016, "Identity mappings"): a block is ``x + conv(act(conv(act
  x)))``, and every conv but the stem is preceded by an activation, so the skip path stays purely
  additive from stem to head.
* **Upsampling by nearest neighbour then a 3x3 conv**, not ConvTranspose2d. A transposed conv
  can paint a checkerboard (Odena et al. 2016, "Deconvolution and checkerboard artifacts"): each
  output phase has its own kernel taps, and a period-2 pattern is plain to see at 28x28. Nearest
  + conv is smooth by construction; it costs ~2.25x the MACs of ConvTranspose2d(4, 2, 1) in those
  two layers only.
* **Downsampling by a 4x4 stride-2 conv** (as in the plain ``conv`` encoder): the kernel is a
  multiple of the stride, so every input pixel is covered equally often.

Only torch and :mod:`vae.core.layers` are imported: this module ships inside registered models, and
:mod:`vae.core.model` imports it (so it cannot import :mod:`vae.core.model` back).
"""

from __future__ import annotations

import torch
from torch import nn

from vae.core.layers import SequentialEncoder, activation

__all__ = ["ResNetDecoder", "ResNetEncoder"]


def _check_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) with C in {1, 3} and H, W positive multiples of 4 (two stride-2 stages)."""
    if len(shape) != 3:
        raise ValueError(f"model.arch: 'resnet' needs an image shape (C, H, W), got {shape}")
    ch, h, w = (int(s) for s in shape)
    if ch not in (1, 3):
        raise ValueError(f"model.arch: 'resnet' needs 1 or 3 image channels, got {ch}")
    if h <= 0 or w <= 0 or h % 4 or w % 4:
        raise ValueError(
            f"model.arch: 'resnet' needs height and width divisible by 4, got {(h, w)}"
        )
    return ch, h, w


class _ResBlock(nn.Module):
    """x + conv(act(conv(act(x)))): a pre-activation block whose branch starts at zero."""

    def __init__(self, c: int, act: str) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            activation(act),
            nn.Conv2d(c, c, 3, padding=1),
            activation(act),
            nn.Conv2d(c, c, 3, padding=1),
        )
        nn.init.zeros_(self.branch[-1].weight)  # identity at init; see the module docstring
        nn.init.zeros_(self.branch[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)  # (B, c, h, w)


def _stage(c: int, blocks: int, act: str) -> list[nn.Module]:
    return [_ResBlock(c, act) for _ in range(blocks)]


def _down(c_in: int, c_out: int, act: str) -> list[nn.Module]:
    return [activation(act), nn.Conv2d(c_in, c_out, 4, 2, 1)]  # (h, w) -> (h/2, w/2)


def _up(c_in: int, c_out: int, act: str) -> list[nn.Module]:
    # The activation goes before the upsampling: pointwise, so the same, on 4x fewer pixels.
    return [
        activation(act),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(c_in, c_out, 3, 1, 1),
    ]


class ResNetEncoder(SequentialEncoder):
    """x (B, C, H, W) in [0, 1] -> (B, 2 * latent): the mean and log-variance of q(z|x)."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        channels: int,
        hidden: int,
        latent: int,
        act: str,
        blocks: int = 2,
    ) -> None:
        super().__init__()
        ch, h, w = _check_shape(shape)
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(ch, c, 3, 1, 1),  # stem: (B, c, H, W)
            *_down(c, 2 * c, act),  # (B, 2c, H/2, W/2)
            *_stage(2 * c, blocks, act),
            *_down(2 * c, 2 * c, act),  # (B, 2c, H/4, W/4)
            *_stage(2 * c, blocks, act),
            activation(act),  # the skip path is pre-activation, so the head needs its own
            nn.Flatten(),
            nn.Linear(2 * c * (h // 4) * (w // 4), hidden),
            activation(act),
            nn.Linear(hidden, 2 * latent),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 2 * latent)


class ResNetDecoder(nn.Module):
    """z (B, latent) -> (B, C, H, W): pre-activation outputs (logits or means) of p(x|z).

    No sigmoid here: the VAE applies its likelihood to these values.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        channels: int,
        hidden: int,
        latent: int,
        act: str,
        blocks: int = 2,
    ) -> None:
        super().__init__()
        ch, h, w = _check_shape(shape)
        c = channels
        self.net = nn.Sequential(
            nn.Linear(latent, hidden),
            activation(act),
            nn.Linear(hidden, 2 * c * (h // 4) * (w // 4)),  # no act: blocks pre-activate
            nn.Unflatten(-1, (2 * c, h // 4, w // 4)),  # (B, 2c, H/4, W/4)
            *_stage(2 * c, blocks, act),
            *_up(2 * c, 2 * c, act),  # (B, 2c, H/2, W/2)
            *_stage(2 * c, blocks, act),
            *_up(2 * c, c, act),  # (B, c, H, W)
            activation(act),
            nn.Conv2d(c, ch, 3, 1, 1),  # (B, C, H, W)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (B, C, H, W)
