"""A worker's machine: the pull step that readies a flow run's clone, and the worker itself.

- ``python -m pipelines.worker ready`` is a pull step of ``prefect.yaml``, run in the flow
  run's fresh clone (at the deployed commit): it checks that this environment has what the
  clone's ``requirements.lock`` pins (one line if not, exit 1), then installs the clone itself,
  ``pip install --no-deps -e .``, and checks that ``import vae`` now finds it.
- ``python -m pipelines.worker pushed`` is a build step: HEAD must be on its upstream branch,
  which the workers clone.
- ``python -m pipelines.worker start`` runs ``prefect worker start`` on the ``vae-process``
  pool with one flow run at a time (the editable install is the machine's: two runs at once
  would swap each other's code), heartbeats every 30 s (the zombie automation needs them) and
  this environment's ``bin`` first on PATH, so that ``python`` and ``vae`` are its own.

Each machine (host, or folder with its own virtual environment) installs the pinned stack
once: ``pip install -c requirements.lock -e '.[pipeline,team]'``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from vae.environment import check_environment
from vae.errors import PermanentError

__all__ = ["HEARTBEAT_SECONDS", "InstallFailed", "main", "ready", "worker_env"]

HEARTBEAT_SECONDS = 30  # the shortest Prefect allows; the zombie automation waits 90 s


class InstallFailed(PermanentError, RuntimeError):
    """``pip install -e`` of the clone failed, or another install shadows it."""


def ready(root: Path) -> str:
    """Ready the clone ``root`` to run in this environment; returns where ``vae`` now is."""
    root = root.resolve()
    check_environment(root, sys.prefix)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    pip += ["--no-deps", "--no-build-isolation", "--no-index", "-e", str(root)]
    proc = subprocess.run(pip, capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InstallFailed(f"pip install -e {root} failed ({proc.returncode}): {last[0]}")
    probe = [sys.executable, "-c", "import vae; print(vae.__file__)"]
    found = subprocess.run(probe, capture_output=True, text=True, cwd="/").stdout.strip()
    if not found or not Path(found).resolve().is_relative_to(root):
        raise InstallFailed(
            f"after installing {root}, `import vae` in {sys.prefix} finds {found or 'nothing'}: "
            "another install of vae shadows it (a second editable install on this machine?)"
        )
    return str(Path(found).parent)


def pushed(root: Path) -> str:
    """HEAD's commit, if its upstream branch (the one workers clone) contains it."""
    git = ["git", "-C", str(root)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    upstream = subprocess.run(
        [*git, "rev-parse", "--abbrev-ref", "@{upstream}"], capture_output=True, text=True
    )
    if upstream.returncode:
        raise InstallFailed(f"{root}: the branch has no upstream; push it (git push -u origin)")
    sha, branch = head.stdout.strip(), upstream.stdout.strip()
    contained = subprocess.run([*git, "merge-base", "--is-ancestor", sha, branch])
    if contained.returncode:
        raise InstallFailed(
            f"commit {sha[:12]} is not on {branch}: the workers clone from there; git push first"
        )
    return sha


def worker_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: heartbeats on, and this environment's commands first."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(HEARTBEAT_SECONDS)
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def start(pool: str, name: str | None) -> None:
    """Become ``prefect worker start`` (exec: no wrapper process), with :func:`worker_env`."""
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
    cmd += ["--type", "process", "--limit", "1"] + (["--name", name] if name else [])
    os.execve(sys.executable, cmd, worker_env())


def main(argv: Sequence[str] | None = None) -> int:
    from pipelines.workpool import POOL

    parser = argparse.ArgumentParser(prog="python -m pipelines.worker", description=__doc__)
    parser.add_argument("command", choices=("pushed", "ready", "start"))
    parser.add_argument("--root", type=Path, default=Path("."), help="pushed, ready: the clone")
    parser.add_argument("--pool", default=POOL, help="start: the work pool")
    parser.add_argument("--name", help="start: the worker's name (default: Prefect's)")
    args = parser.parse_args(argv)
    if args.command == "start":
        start(args.pool, args.name)
    try:
        if args.command == "pushed":
            print(pushed(args.root))
        else:
            print(f"vae from {ready(args.root)}, in {sys.prefix}")
    except PermanentError as exc:
        line = f"pipelines.worker {args.command}: error: {exc}"
        print(line, file=sys.stderr)
        _fail_flow_run(line)
        return 1
    return 0


def _fail_flow_run(message: str) -> None:
    """Inside a flow run's pull step: end the run Failed with ``message``, so the UI and the
    notification say why (Prefect would only say that the process exited with 1)."""
    run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if not run_id:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Failed(message=message), force=True)


if __name__ == "__main__":
    sys.exit(main())
