"""An exponential moving average of the weights (``train.ema_decay``).

The average of the last few thousand steps' weights is a better model than the last step's:
it smooths out the noise of the final steps the way a falling learning rate does, at no cost
to the training trajectory (the optimiser never sees it). Training validates, keeps and
registers the average, so ``evaluate``, the registry and every consumer see it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Shadow weights e <- d * e + (1 - d) * w after every optimiser step t (0-based).

    d = min(decay, (1 + t) / (10 + t)): early on the average forgets its random initialisation
    quickly (the warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: {decay} is out of range; expected 0 < decay < 1")
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for e, w in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(w.detach(), 1.0 - d)
        for e, w in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(w)
