"""The CPU and GPU number formats a training run uses: bf16 autocast, and flushed subnormals."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["autocast_for", "flush_denormals"]


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA under ``precision: auto``, or everywhere under ``bf16``."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def flush_denormals(device: torch.device) -> Any:
    """Treat subnormal floats as zero on the CPU while training, then restore the default.

    Adam's first-moment estimate of a weight whose gradient is exactly zero (every weight into
    a ReLU unit that has stopped firing) decays geometrically into the subnormal range within a
    few hundred steps, and x86 arithmetic on subnormals is many times slower, so later epochs
    slow down (benchmarks/README.md, "Figures behind the code's choices"). The values lost are
    below 1.2e-38.
    """
    enabled = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)
