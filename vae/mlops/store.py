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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from vae.errors import PermanentError, RetryableError
from vae.mlops.lineage import dvc_root

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = [
    "NotAllowed",
    "TrackingUnavailable",
    "check_reachable",
    "client",
    "one_line_errors",
    "local_store",
    "project_root",
    "redact",
    "tracking_uri",
]


class TrackingUnavailable(RetryableError, RuntimeError):
    """The tracking server cannot be reached, or failed on its side (retryable)."""


class NotAllowed(PermanentError, RuntimeError):
    """The tracking server refused these credentials: not authenticated, or not permitted."""


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


@contextmanager
def one_line_errors(uri: str, what: str) -> Iterator[None]:
    """Turn a tracking server's refusal or failure inside the block into one line of ours.

    401 is :class:`NotAllowed` naming the variables to set; 403 is :class:`NotAllowed` naming
    the user; 5xx and a server that stopped answering are :class:`TrackingUnavailable` (exit
    75). Anything else (an unknown model, a bad request) goes on as MLflow raised it.
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        status = exc.get_http_status_code()
        where = redact(uri)
        if exc.error_code == "UNAUTHENTICATED" or status == 401:
            raise NotAllowed(
                f"{what}: {where} says you are not authenticated; set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            ) from None
        if exc.error_code == "PERMISSION_DENIED" or status == 403:
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
            raise NotAllowed(f"{what}: {where} denies {user} permission to do this") from None
        if status >= 500 and uri.startswith(("http://", "https://")):
            first = str(exc.message).splitlines()[0][:300]
            raise TrackingUnavailable(f"{what}: {where} failed ({first}); try again") from None
        raise


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves the project's own store


def artifact_page(experiment_id: str, run_id: str, path: str, uri: str | None = None) -> str:
    """The MLflow UI's page of one run artifact: the server's own UI (without any credentials
    of the URI), or for a local store the address ``mlflow ui`` serves it at."""
    uri = uri or tracking_uri()
    server = uri.startswith(("http://", "https://"))
    base = re.sub(r"//[^/@]*@", "//", uri).rstrip("/") if server else LOCAL_UI  # no user:password
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}"
