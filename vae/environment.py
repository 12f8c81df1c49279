"""Whether this Python environment is the one ``requirements.lock`` pins.

A worker's machine installs the pinned stack once; each flow run then installs only the
project (``pip install --no-deps -e``) at its commit. A commit whose lock pins other versions
must fail in one line rather than run on packages it was never tested with, or build a new
multi-gigabyte environment per run.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from vae.errors import PermanentError

__all__ = ["EnvironmentMismatch", "check_environment", "lock_differences", "lock_pins"]

WORKER_EXTRAS = ("pipeline", "team")  # what a flow run on a team's worker imports


class EnvironmentMismatch(PermanentError, RuntimeError):
    """This environment has other versions than the commit's requirements.lock pins."""


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares it: ``PyYAML`` and ``pyyaml`` are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(lock: Path) -> dict[str, str]:
    """``name==version`` lines of a lock file, by canonical name (comments and blanks skipped)."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise EnvironmentMismatch(f"{lock}: {line!r} is not a name==version pin")
        pins[canonical(name.split("[", 1)[0].strip())] = version.split(";", 1)[0].strip()
    return pins


def _required(pyproject: Path, extras: tuple[str, ...]) -> set[str]:
    """The names the project declares: its dependencies and those of ``extras``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return {canonical(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]) for req in reqs}


def _installed() -> dict[str, str]:
    """Installed versions by canonical name; the first on ``sys.path`` wins, as for imports."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


def _same(pinned: str, installed: str) -> bool:
    """``==pinned`` as pip reads it: a local label (``2.14.1+cpu``) still matches ``2.14.1``."""
    return installed == pinned or installed.split("+", 1)[0] == pinned


def lock_differences(root: Path, extras: tuple[str, ...] = WORKER_EXTRAS) -> list[str]:
    """What differs between ``root``'s lock and this environment, one phrase per package.

    A pinned package that is installed must have the pinned version; the ones the project
    declares (its dependencies and ``extras``) must be installed. Pins of other extras (dev
    tools, Spark) may be absent. The project itself is not compared.
    """
    pins, installed = lock_pins(root / "requirements.lock"), _installed()
    project = canonical(tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"])
    needed = _required(root / "pyproject.toml", extras) - {project}
    out = []
    for name, version in sorted(pins.items()):
        if name == project:
            continue
        have = installed.get(name)
        if have is None:
            if name in needed:
                out.append(f"{name} {version} (not installed)")
        elif not _same(version, have):
            out.append(f"{name} {version} (installed {have})")
    out += [f"{name} (not in requirements.lock)" for name in sorted(needed - set(pins))]
    return out


def check_environment(root: Path, where: str, extras: tuple[str, ...] = WORKER_EXTRAS) -> None:
    """Raise :class:`EnvironmentMismatch` in one line naming the first differences."""
    diffs = lock_differences(root, extras)
    if diffs:
        shown = ", ".join(diffs[:3]) + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise EnvironmentMismatch(
            f"requirements.lock differs from the environment at {where}: {shown}; install the "
            f"lock there once (pip install -c requirements.lock -e '.[{','.join(extras)}]')"
        )
