"""Devices, and multi-process training: ``torchrun --nproc_per_node=N -m vae train``.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; this module turns them into a process group
(NCCL on GPUs, gloo on CPUs) and the rank's device. The training loop then wraps the model in
DistributedDataParallel, gives each rank its shard of every global batch of the device-resident
data, and lets only rank 0 write checkpoints, metrics and MLflow records.
"""

from __future__ import annotations

import os

import torch

__all__ = ["init_from_env", "rank_and_world", "select_device", "shutdown"]


def init_from_env(device_request: str = "auto") -> tuple[int, int, torch.device | None]:
    """(rank, world_size, device); (0, 1, None) when not launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device_request.startswith("cuda") or device_request == "auto"
    if wants_cuda and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def select_device(requested: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; an explicit request that is unavailable is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    from vae.config import ConfigError

    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device: {requested!r}, but this machine has no CUDA device that torch "
            f"{torch.__version__} can use; set train.device: auto or cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device: {requested!r}, but this machine has {torch.cuda.device_count()} "
            "CUDA device(s)"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device: {requested!r}, but MPS is not available here")
    return dev
