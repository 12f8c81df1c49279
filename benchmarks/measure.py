"""What the benchmark measures besides wall time: peak memory, CPU time, the machine.

``sync`` brackets timings on CUDA; ``peak_rss`` is read in every row's child process;
``machine_cpu_seconds`` and ``own_cpu_seconds`` give the share of the CPU that other processes
took while a row ran; ``describe_machine`` is the machine block of ``results.json``.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss() -> int:
    """This process's peak resident set size in bytes.

    Linux's ``getrusage(RUSAGE_SELF).ru_maxrss`` survives ``execve``: a child forked from this
    driver would report the driver's own RSS as its peak. ``VmHWM`` belongs to the process's
    own address space, so it starts afresh at exec; elsewhere fall back to ``ru_maxrss``.
    """
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(ln for ln in status if ln.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
            1 if sys.platform == "darwin" else 1024
        )


def machine_cpu_seconds() -> float | None:
    """CPU seconds used by every process on the machine, steal included (Linux only)."""
    try:
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = cpu
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def describe_machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {
        "cpu_model": model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
