"""The MLflow store: which one (the tracking URI), whether it answers, and one way to a client.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set (a team server: credentials come from
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``, never
from params), else the project's ``mlflow.db``. The project is DVC's ``DVC_ROOT`` when DVC runs
the command, so an experiment that runs in a temporary copy (``dvc exp run --temp``, queued
experiments) logs into the project's store, not the copy's; otherwise it is the current folder.

Every ``MlflowClient`` of the project comes from :func:`client`, with the same retry settings.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from vae.errors import RetryableError
from vae.mlops.lineage import dvc_root

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = [
    "TrackingUnavailable",
    "check_reachable",
    "client",
    "local_store",
    "project_root",
    "redact",
    "tracking_uri",
]


class TrackingUnavailable(RetryableError, RuntimeError):
    """The tracking server cannot be reached."""


def project_root(root: str | Path | None = None) -> Path:
    """The project whose ``mlflow.db`` is the default store: ``root``, DVC_ROOT, or the cwd."""
    return Path(root or dvc_root() or Path.cwd()).resolve()


def local_store(root: str | Path | None = None) -> str:
    return f"sqlite:///{project_root(root) / 'mlflow.db'}"


def tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else the project's ``sqlite:///<project>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_store(root)


def redact(uri: str) -> str:
    """Hide a password in ``scheme://user:password@host`` before it reaches a log or a tag."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail within seconds, naming the URI, if an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status >= 500:
                raise TrackingUnavailable(f"{redact(uri)} answered {resp.status}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
            return  # it answers; /health may just be behind auth or a proxy
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(
            f"MLflow tracking server {redact(uri)} is unreachable ({reason}); start it, fix "
            "MLFLOW_TRACKING_URI, or unset it to track in the project's mlflow.db"
        ) from None


def client(uri: str | None = None) -> MlflowClient:
    """An ``MlflowClient`` of ``uri`` (default: :func:`tracking_uri`), failing over in seconds.

    MLflow's own defaults retry an unreachable server for minutes; these settings give up after
    about 7 s. A user's own ``MLFLOW_HTTP_REQUEST_*`` variables win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())
