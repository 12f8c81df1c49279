"""The stack's state folder: its ports, its generated secrets, and the env files of its users.

Everything the stack needs to come back up the same way lives in one folder (``stack.json``,
mode 0600): the ports chosen on the first start and the secrets generated then. Clients read
an env file per role (``env/<role>.env``): the URLs and that role's credentials, nothing else.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import string
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "HOST",
    "PORTS",
    "ROLES",
    "SERVICE_PORTS",
    "Stack",
    "free_port",
    "free_ports",
    "load_or_create",
]

HOST = "127.0.0.1"  # every service binds and advertises this address
PORTS = (
    "postgres",
    "s3",
    "s3_grpc",
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "admin",
    "admin_grpc",
    "mlflow",
    "prefect",
)
SERVICE_PORTS = {  # the ports each service listens on
    "postgres": ("postgres",),
    "s3": PORTS[1:11],
    "mlflow": ("mlflow",),
    "prefect": ("prefect",),
}
ROLES = ("admin", "writer", "reader")  # MLflow users: webhooks and users; the pipeline; consumers
BUCKETS = ("mlflow", "dvc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports(names: tuple[str, ...] | list[str]) -> dict[str, int]:
    """A free port for each name, all distinct: a port released may be handed out again."""
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        port = free_port()
        if port not in ports.values():
            ports[names[len(ports)]] = port
    return ports


@dataclass(frozen=True)
class Stack:
    """One team stack: where its state lives, its ports and its secrets."""

    state: Path
    ports: dict[str, int]
    secrets: dict[str, str]

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def prefect_url(self) -> str:
        return f"http://{HOST}:{self.ports['prefect']}/api"

    @property
    def s3_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def service_ports(self, name: str) -> list[int]:
        """The ports service ``name`` listens on."""
        return [self.ports[port] for port in SERVICE_PORTS[name]]

    def db_url(self, db: str, driver: str = "psycopg2") -> str:
        """A SQLAlchemy URL of database ``db`` as its owner (``mlflow`` or ``prefect``)."""
        owner = "prefect" if db == "prefect" else "mlflow"
        password = self.secrets[f"pg_{owner}"]
        return f"postgresql+{driver}://{owner}:{password}@{HOST}:{self.ports['postgres']}/{db}"

    def s3_env(self) -> dict[str, str]:
        """What an S3 client of the store needs: the endpoint and the keys."""
        return {
            "AWS_ACCESS_KEY_ID": self.secrets["s3_key"],
            "AWS_SECRET_ACCESS_KEY": self.secrets["s3_secret"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
        }

    def dvc_env(self) -> dict[str, str]:
        """What ``dvc push``/``pull`` need: the keys, and two tries per request, not five.

        botocore's default retries a refused connection for about 14 s per file; with a dead
        store a push of hundreds of files would stall for minutes. dvc-s3 has no retry key, so
        the limit goes in the environment (or ``max_attempts`` in ``~/.aws/config``).
        """
        keys = {k: v for k, v in self.s3_env().items() if k.startswith("AWS_")}
        return {**keys, "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}

    def client_env(self, role: str) -> dict[str, str]:
        """The environment of an MLflow user ``role``: the servers and its own credentials."""
        if role not in ROLES:
            raise ValueError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": role,
            "MLFLOW_TRACKING_PASSWORD": self.secrets[f"mlflow_{role}"],
            "PREFECT_API_URL": self.prefect_url,
        }

    def path(self, *parts: str) -> Path:
        return self.state.joinpath(*parts)

    def write_env_files(self) -> None:
        """``env/<role>.env`` for each MLflow user and ``env/s3.env`` for DVC, mode 0600."""
        folder = self.path("env")
        folder.mkdir(exist_ok=True)
        files = {f"{role}.env": self.client_env(role) for role in ROLES}
        files["s3.env"] = self.dvc_env()
        for name, env in files.items():
            text = "".join(f"export {k}={v}\n" for k, v in env.items())
            _write_private(folder / name, text)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _token(n: int) -> str:
    """``n`` random letters and digits: safe in a URL, an env file and a command line."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(n))


def _new_secrets() -> dict[str, str]:
    from cryptography.fernet import Fernet

    token = _token
    return {
        "pg_postgres": token(18),
        "pg_mlflow": token(18),
        "pg_prefect": token(18),
        "s3_key": "vae" + secrets.token_hex(8),
        "s3_secret": token(30),
        **{f"mlflow_{role}": token(18) for role in ROLES},  # >= 12 characters, as MLflow asks
        "flask_secret": token(32),
        "webhook_encryption_key": Fernet.generate_key().decode(),
        "webhook_secret": token(24),
    }


def load_or_create(state: str | Path) -> Stack:
    """The stack of folder ``state``: read back, or created with free ports and new secrets."""
    state = Path(state).absolute()
    record = state / "stack.json"
    if record.is_file():
        data = json.loads(record.read_text())
        return Stack(state, data["ports"], data["secrets"])
    state.mkdir(parents=True, exist_ok=True)
    stack = Stack(state, free_ports(PORTS), _new_secrets())
    body = {k: v for k, v in asdict(stack).items() if k != "state"}
    _write_private(record, json.dumps(body, indent=1))
    return stack
