"""Small layers the encoders and decoders share (vae.core.model, vae.core.resnet); shipped
with every registered model, so only torch is imported."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Encoder", "Gated", "SequentialEncoder", "activation", "mlp_layers"]


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

    @staticmethod
    def gate(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The layer's output from its two pre-activations, W x + b and V x + c."""
        return h * torch.sigmoid(g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.h(x), self.g(x))


def mlp_layers(
    n_in: int, hidden: int, layers: int, n_out: int, act: str, gated: bool
) -> list[nn.Module]:
    """``layers`` hidden layers of ``hidden`` units (plain + activation, or gated), then a linear
    output. The plain layout keeps the module indices of the one-layer models saved before
    ``hidden_layers`` existed."""
    mods: list[nn.Module] = []
    for i in range(layers):
        width = n_in if i == 0 else hidden
        mods += [Gated(width, hidden)] if gated else [nn.Linear(width, hidden), activation(act)]
    return [*mods, nn.Linear(hidden, n_out)]


class Encoder(nn.Module):
    """x -> ``features(x)`` (B, F) -> ``head`` -> (B, 2 * latent): the mean and log-variance of
    q(z|x). A second stochastic layer reads the features too, so an encoder exposes both."""

    head: nn.Module

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SequentialEncoder(Encoder):
    """An encoder whose layers are one ``self.net`` Sequential, the head its last layer (the
    parameter names ``encoder.net.N`` of every saved model)."""

    net: nn.Sequential

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[:-1](x)

    @property
    def head(self) -> nn.Module:  # type: ignore[override]
        return self.net[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
