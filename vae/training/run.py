"""The state of a training run: what the loop carries from step to step (:class:`Run`), and what
it hands back (:class:`TrainResult`). The loop (:mod:`vae.training.train`) and its callbacks
(:mod:`vae.training.callbacks`) both read it; neither imports the other for it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from vae.config import Config
from vae.core.model import VAE
from vae.training.ema import EMA

__all__ = ["Run", "TrainResult"]


@dataclass
class TrainResult:
    model: VAE  # the best-validation weights
    history: list[dict[str, float]]  # one row per epoch
    metrics: dict[str, Any]  # what metrics/train.json holds
    resumed_from: int  # completed epochs found in the checkpoint (0 = fresh)


@dataclass
class Run:
    """What the loop carries from step to step, and what a checkpoint saves and restores."""

    cfg: Config
    model: VAE
    net: torch.nn.Module  # what a step calls: the model, wrapped by DDP and/or compiled
    opt: torch.optim.Optimizer
    shuffle_gen: torch.Generator  # CPU: the epoch's permutation
    noise_gen: torch.Generator  # on the device: binarization noise and eps
    x_val: torch.Tensor  # the validation images, binarized once
    autocast: contextlib.AbstractContextManager[Any]
    n: int  # training images
    rank: int = 0
    world: int = 1
    epoch: int = 0  # completed epochs
    step: int = 0  # completed batches (steps, skipped ones included)
    skipped: int = 0  # batches of this epoch whose step train.skip_grad_norm skipped
    history: list[dict[str, float]] = field(default_factory=list)
    best_loss: float = math.inf  # the best validation objective so far, of epoch best_epoch
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    ema: EMA | None = None  # the averaged weights, when train.ema_decay > 0

    @property
    def evaluated(self) -> VAE:
        """The weights that are validated, kept and registered: the EMA's, when there is one."""
        return self.model if self.ema is None else self.ema.model

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n / self.cfg.train.batch_size)
