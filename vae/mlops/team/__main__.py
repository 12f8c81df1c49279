"""``python -m vae.mlops.team up|down|status|env``: the team stack from one command each.

- ``up``: start what is not running, in order, and wait until each answers (PostgreSQL, the
  object store, MLflow, Prefect); prints each service's URL, time and memory.
- ``down``: stop them all, in reverse order; the state folder (data, secrets) stays.
- ``status``: which services run, and their memory.
- ``env ROLE``: ``export`` lines for an MLflow user (admin, writer, reader) or ``s3`` (DVC).
- ``spark-up`` / ``spark-down``: a Spark standalone cluster, a master and ``--workers`` workers
  of ``--cores`` cores each (:mod:`vae.mlops.team.spark`); ``vae encode --engine spark
  --master <the URL it prints>`` scores on it. Only for the jobs that need it: it is not in
  ``up``.

The state folder is ``--state``, else ``TEAM_STATE``, else ``/tmp/vae-team``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vae.errors import VaeError
from vae.mlops.team.procs import running
from vae.mlops.team.services import SERVICES, start_service, stop_service
from vae.mlops.team.state import ROLES, Stack, load_or_create

DEFAULT_STATE = Path("/tmp/vae-team")


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, in MiB (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def service_pid(stack: Stack, name: str) -> int | None:
    if name != "postgres":
        return running(stack.state, name)
    pid_file = stack.path("postgres", "data", "postmaster.pid")
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def up(state: str | Path) -> Stack:
    """Start the stack of folder ``state`` (what already runs is only checked)."""
    stack = load_or_create(state)
    for name in SERVICES:
        began = time.monotonic()
        start_service(stack, name)
        pid = service_pid(stack, name)
        rss = f"{rss_mib(pid):.0f} MiB" if pid else "-"
        print(f"{name:8} up in {time.monotonic() - began:5.1f} s  {rss:>9}  {_url(stack, name)}")
    stack.write_env_files()
    print(f"state: {stack.state}; clients: source {stack.path('env')}/<role>.env")
    return stack


def down(state: str | Path) -> None:
    stack = load_or_create(state)
    for name in reversed(SERVICES):
        print(f"{name:8} {'stopped' if stop_service(stack, name) else 'was not running'}")


def status(state: str | Path) -> int:
    stack = load_or_create(state)
    down_count = 0
    for name in SERVICES:
        pid = service_pid(stack, name)
        down_count += pid is None
        what = f"pid {pid}, {rss_mib(pid):.0f} MiB" if pid else "not running"
        print(f"{name:8} {what:24} {_url(stack, name)}")
    return 1 if down_count else 0


def spark(command: str, state: str | Path, workers: int, cores: int, memory: str) -> None:
    from vae.mlops.team.spark import load_cluster, start_cluster, stop_cluster

    cluster = load_cluster(state, workers, cores, memory)
    if command == "spark-down":
        print("stopped: " + (", ".join(stop_cluster(cluster)) or "nothing was running"))
        return
    began = time.monotonic()
    start_cluster(cluster)
    print(f"spark    up in {time.monotonic() - began:5.1f} s  {cluster.url} (UI {cluster.ui})")


def _url(stack: Stack, name: str) -> str:
    return {
        "postgres": f"postgresql://127.0.0.1:{stack.ports['postgres']}",
        "s3": stack.s3_url,
        "mlflow": stack.mlflow_url,
        "prefect": stack.prefect_url,
    }[name]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vae.mlops.team", description=__doc__)
    parser.add_argument(
        "command", choices=("up", "down", "status", "env", "spark-up", "spark-down")
    )
    parser.add_argument("role", nargs="?", choices=(*ROLES, "s3"))
    parser.add_argument("--state", default=os.environ.get("TEAM_STATE") or DEFAULT_STATE)
    parser.add_argument("--workers", type=int, default=2, help="spark-up: how many workers")
    parser.add_argument("--cores", type=int, default=1, help="spark-up: cores per worker")
    parser.add_argument("--memory", default="2g", help="spark-up: memory per worker")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.state)
        elif args.command == "down":
            down(args.state)
        elif args.command == "status":
            return status(args.state)
        elif args.command.startswith("spark-"):
            spark(args.command, args.state, args.workers, args.cores, args.memory)
        else:
            if args.role is None:
                parser.error("env needs a role: admin, writer, reader or s3")
            stack = load_or_create(args.state)
            env = stack.dvc_env() if args.role == "s3" else stack.client_env(args.role)
            print("".join(f"export {k}={v}\n" for k, v in env.items()), end="")
    except VaeError as exc:
        print(f"team {args.command}: error: {exc}", file=sys.stderr)
        return 75
    return 0


if __name__ == "__main__":
    sys.exit(main())
