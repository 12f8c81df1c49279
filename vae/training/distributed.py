"""Devices, and multi-process training: torchrun, by hand or launched by ``vae train``.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; this module turns them into a process group
(NCCL on GPUs, gloo on CPUs) and the rank's device. The training loop then wraps the model in
DistributedDataParallel, gives each rank its shard of every global batch of the device-resident
data, and lets only its rank 0 write checkpoints, metrics and MLflow records.

Launched by ``vae train`` (:mod:`vae.training.launch`), the writer is the first process of the
node that ran ``vae train`` (the others ran ``vae train --join``), whichever global rank c10d
gave it: ranks here count from it, so "rank 0" is the process in the clone DVC runs in.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = [
    "LAUNCHED_ENV",
    "agree",
    "from_writer",
    "init_from_env",
    "rank_and_world",
    "select_device",
    "shutdown",
]

# Set by vae.training.launch on every process it starts: "writer" on the leading node, else "join"
LAUNCHED_ENV = "VAE_TRAIN_LAUNCHED"
_writer = 0  # the writer's global rank in the process group


def init_from_env(device_request: str = "auto") -> tuple[int, int, torch.device | None]:
    """(rank, world_size, device); (0, 1, None) when not launched by torchrun."""
    global _writer
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
    if LAUNCHED_ENV in os.environ:
        writes = os.environ[LAUNCHED_ENV] == "writer" and local_rank == 0
        flags: list[Any] = [None] * world
        dist.all_gather_object(flags, writes)
        writers = [rank for rank, flag in enumerate(flags) if flag]
        if len(writers) != 1:
            from vae.config import ConfigError

            raise ConfigError(
                f"train.nnodes: {len(writers)} of the nodes that joined run `vae train`; "
                "run it on one node and `vae train --join` on every other"
            )
        _writer = writers[0]
    return rank_and_world()[0], world, device


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of this process, counted from the writer; (0, 1) outside a group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        return (dist.get_rank() - _writer) % world, world
    return 0, 1


def from_writer(obj: Any) -> Any:
    """The writer's ``obj``, on every rank (one broadcast); ``obj`` itself outside a group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=_writer)
    return box[0]


def agree(what: str, value: Any) -> None:
    """Every rank's ``value`` must be the writer's; else each rank raises a ConfigError."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v != values[_writer] for v in values):
        from vae.config import ConfigError

        odd = sorted({repr(v) for v in values if v != values[_writer]})
        raise ConfigError(
            f"{what}: the leading node has {values[_writer]!r}, another {', '.join(odd)}; every "
            "node needs the same commit, params.yaml and `dvc pull`ed data"
        )


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
