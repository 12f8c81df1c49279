"""The four services of the team stack, each started on 127.0.0.1 and checked until it answers.

- PostgreSQL 15 (:mod:`vae.mlops.team.postgres`): databases ``mlflow``, ``mlflow_auth``
  (MLflow's users) and ``prefect``.
- SeaweedFS (``weed mini``): the S3-compatible object store, buckets ``mlflow`` and ``dvc``;
  its identity comes from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in its environment.
- MLflow (``mlflow server --app-name basic-auth``): tracking and registry on PostgreSQL,
  artifacts proxied to ``s3://mlflow/artifacts``, so clients need no S3 keys.
- Prefect (``prefect server start``) on PostgreSQL: the shared API of the registry lock.

Every secret reaches a server through its environment or a 0600 file, never its command line.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
import urllib.request
from pathlib import Path

from vae.mlops.team.postgres import check_login, start_postgres, stop_postgres
from vae.mlops.team.procs import (
    ServiceError,
    ensure_ports_free,
    http_ok,
    running,
    start,
    stop,
    wait_until,
)
from vae.mlops.team.state import BUCKETS, HOST, Stack

__all__ = ["SERVICES", "bootstrap_users", "start_service", "stop_service"]

SERVICES = ("postgres", "s3", "mlflow", "prefect")  # the order they start in


def _bin(name: str) -> str:
    """A console script of this environment (weed, mlflow, prefect), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise ServiceError(f"{name}: not installed; pip install -e '.[team]'")
    return found


# --- the object store -------------------------------------------------------------------------


def _start_s3(stack: Stack) -> None:
    if running(stack.state, "s3") is None:
        p = stack.ports
        args = [_bin("weed"), "mini", f"-dir={stack.path('s3')}", f"-ip={HOST}"]
        args += [f"-ip.bind={HOST}", "-master.telemetry=false", f"-bucket={','.join(BUCKETS)}"]
        for flag in ("master", "volume", "filer", "s3", "admin"):
            args += [f"-{flag}.port={p[flag]}", f"-{flag}.port.grpc={p[flag + '_grpc']}"]
        # what the stack does not use: WebDAV, the admin UI, the Iceberg and Lance catalogues
        args += ["-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        env = {**_clean_env(), **stack.s3_env()}
        ensure_ports_free("the object store", HOST, stack.service_ports("s3"))
        start(stack.state, "s3", args, env, stack.path("s3"))
    wait_until(
        lambda: http_ok(f"{stack.s3_url}/healthz"), "the object store", 90, stack.state, "s3"
    )
    wait_until(lambda: _buckets_ready(stack), "the object store's buckets", 60, stack.state, "s3")
    check_buckets(stack)


def s3_client(stack: Stack, key: str | None = None, secret: str | None = None):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=stack.s3_url,
        aws_access_key_id=key or stack.secrets["s3_key"],
        aws_secret_access_key=secret or stack.secrets["s3_secret"],
        region_name="us-east-1",
        config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}),
    )


def _buckets_ready(stack: Stack) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        names = {b["Name"] for b in s3_client(stack).list_buckets()["Buckets"]}
    except (BotoCoreError, ClientError):
        return False
    return set(BUCKETS) <= names


def check_buckets(
    stack: Stack,
    key: str | None = None,
    secret: str | None = None,
    buckets: tuple[str, ...] = BUCKETS,
) -> None:
    """Each bucket answers to these keys; otherwise say whether the keys or a bucket is wrong."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(stack, key, secret)
    for bucket in buckets:
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ServiceError(
                    f"the object store at {stack.s3_url} refuses the S3 keys "
                    f"(AWS_ACCESS_KEY_ID {key or stack.secrets['s3_key']}): {code}"
                ) from None
            if code in ("404", "NoSuchBucket"):
                raise ServiceError(
                    f"the object store at {stack.s3_url} has no bucket {bucket!r}"
                ) from None
            raise ServiceError(f"bucket {bucket!r} at {stack.s3_url}: {code}") from None
        except BotoCoreError as exc:
            raise ServiceError(f"the object store at {stack.s3_url}: {exc}") from None


# --- MLflow -----------------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    """This process's environment less what would point a server at another store or user."""
    drop = ("MLFLOW_TRACKING_", "PREFECT_API_", "AWS_", "MLFLOW_S3_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def mlflow_env(stack: Stack) -> dict[str, str]:
    auth_ini = stack.path("mlflow", "basic_auth.ini")
    auth_ini.parent.mkdir(exist_ok=True)
    auth_ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {stack.db_url('mlflow_auth')}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # PBKDF2 on every request costs ~0.5 s of CPU: cache a checked credential for 60 s (a
        # password changed on another worker is honoured within that time)
        "auth_cache_ttl_seconds = 60\n"
    )
    auth_ini.chmod(0o600)
    return {
        **_clean_env(),
        **stack.s3_env(),  # the server's, for the proxied artifacts; clients never see them
        "MLFLOW_BACKEND_STORE_URI": stack.db_url("mlflow"),
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": stack.secrets["mlflow_admin"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": stack.secrets["flask_secret"],
        # one key for every worker and restart, or a webhook's secret cannot be decrypted
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": stack.secrets["webhook_encryption_key"],
        # for receivers on 127.0.0.1 over http: local testing only (production: https, public)
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_CACHE_TTL": "2",  # a new webhook is seen within 2 s, not 60
        # no job runner: its seven huey consumers (about 1.8 GB) serve GenAI jobs, unused here
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }


def _start_mlflow(stack: Stack) -> None:
    if running(stack.state, "mlflow") is None:
        args = [_bin("mlflow"), "server", "--app-name", "basic-auth", "--host", HOST]
        args += ["--port", str(stack.ports["mlflow"]), "--workers", "1"]
        args += ["--artifacts-destination", "s3://mlflow/artifacts"]
        ensure_ports_free("the MLflow server", HOST, stack.service_ports("mlflow"))
        for db in ("mlflow", "mlflow_auth"):
            check_login(stack, db, "the MLflow server")
        start(stack.state, "mlflow", args, mlflow_env(stack), stack.path("mlflow"))
    url = stack.mlflow_url
    wait_until(lambda: http_ok(f"{url}/health"), "the MLflow server", 180, stack.state, "mlflow")
    wait_until(lambda: _mlflow_answers(stack), "MLflow's store", 60, stack.state, "mlflow")
    bootstrap_users(stack)


def _mlflow_answers(stack: Stack) -> bool:
    """An admin's search: the database behind the server answers too."""
    token = base64.b64encode(f"admin:{stack.secrets['mlflow_admin']}".encode()).decode()
    url = f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def bootstrap_users(stack: Stack) -> None:
    """The ``writer`` and ``reader`` users, created by the admin when missing.

    ``default_permission`` is READ, so the reader reads everything and changes nothing; what the
    writer creates (experiments, registered models) it manages, as their creator.
    """
    import warnings

    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # the server app's Starlette deprecation, not ours
        warnings.filterwarnings("ignore", message="starlette.middleware.wsgi is deprecated")
        from mlflow.server.auth.client import AuthServiceClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"
    os.environ["MLFLOW_TRACKING_PASSWORD"] = stack.secrets["mlflow_admin"]
    try:
        auth = AuthServiceClient(stack.mlflow_url)
        for role in ("writer", "reader"):
            try:
                auth.get_user(role)
            except MlflowException:
                auth.create_user(role, stack.secrets[f"mlflow_{role}"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- Prefect ----------------------------------------------------------------------------------


def prefect_env(stack: Stack) -> dict[str, str]:
    return {
        **_clean_env(),
        "PREFECT_HOME": str(stack.path("prefect")),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": stack.db_url("prefect", "asyncpg"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # leases outlive a server restart, and a killed holder's lease is revoked within 5 s
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": (
            "prefect.server.concurrency.lease_storage.filesystem"
        ),
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
        "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
    }


def _start_prefect(stack: Stack) -> None:
    if running(stack.state, "prefect") is None:
        args = [_bin("prefect"), "server", "start", "--host", HOST]
        args += ["--port", str(stack.ports["prefect"]), "--no-ui", "--analytics-off"]
        ensure_ports_free("the Prefect server", HOST, stack.service_ports("prefect"))
        check_login(stack, "prefect", "the Prefect server")
        start(stack.state, "prefect", args, prefect_env(stack), stack.path("prefect"))
    url = stack.prefect_url
    wait_until(lambda: http_ok(f"{url}/health"), "the Prefect server", 180, stack.state, "prefect")
    wait_until(lambda: http_ok(f"{url}/ready"), "Prefect's database", 60, stack.state, "prefect")


def start_service(stack: Stack, name: str) -> None:
    {"postgres": start_postgres, "s3": _start_s3, "mlflow": _start_mlflow}.get(
        name, _start_prefect
    )(stack)


def stop_service(stack: Stack, name: str) -> bool:
    if name == "postgres":
        return stop_postgres(stack)
    return stop(stack.state, name)
