"""Small layers the encoders and decoders share (vae.model, vae.resnet); shipped with every
registered model, so only torch is imported."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Gated", "activation"]


def activation(name: str) -> nn.Module:
    """The nonlinearity ``model.activation`` names; leaky_relu has a negative slope of 0.1."""
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1)
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"model.activation: unknown {name!r}")


class Gated(nn.Module):
    """h = (W x + b) * sigmoid(V x + c): a gated layer (Dauphin et al. 2017), as in the MLPs of
    the VampPrior and Exemplar VAE papers; the gate replaces the nonlinearity."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.h, self.g = nn.Linear(n_in, n_out), nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))
