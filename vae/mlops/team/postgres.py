"""PostgreSQL 15 for the stack: one server, databases ``mlflow``, ``mlflow_auth``, ``prefect``.

It refuses to run as root, so as root it runs as the ``postgres`` user (``runuser``), in a
folder that user owns; it listens on 127.0.0.1 only, with its socket in the state folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from vae.mlops.team.procs import ServiceError, ensure_ports_free
from vae.mlops.team.state import HOST, Stack

__all__ = ["check_login", "pg_connect", "start_postgres", "stop_postgres"]

PG_VERSION = 15


def pg_bindir() -> Path:
    for folder in (Path(f"/usr/lib/postgresql/{PG_VERSION}/bin"), Path("/usr/local/bin")):
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    raise ServiceError(
        f"PostgreSQL {PG_VERSION} not found; install it (apt-get install postgresql-{PG_VERSION})"
    )


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _pg_folder(stack: Stack) -> Path:
    folder = stack.path("postgres")
    if folder.exists():
        return folder
    folder.mkdir(mode=0o700)
    if os.geteuid() == 0:  # the server runs as postgres: it owns its folder, and can reach it
        shutil.chown(folder, "postgres", "postgres")
        stack.state.chmod(0o711)
        for parent in stack.state.parents:
            if not parent.stat().st_mode & 0o001:
                raise ServiceError(
                    f"{parent}: the postgres user cannot traverse it; choose a state folder "
                    "under /tmp (TEAM_STATE=/tmp/vae-team)"
                )
    return folder


def start_postgres(stack: Stack) -> None:
    folder, bindir = _pg_folder(stack), pg_bindir()
    data = folder / "data"
    if not (data / "PG_VERSION").exists():
        pwfile = folder / "pwfile"
        pwfile.write_text(stack.secrets["pg_postgres"] + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8"]
        initdb += ["-A", "scram-sha-256", f"--pwfile={pwfile}", "--no-instructions"]
        _run(_as_postgres(initdb), "initdb")
        pwfile.unlink()
    if not _pg_ready(stack):
        ensure_ports_free("PostgreSQL", HOST, stack.service_ports("postgres"))
        options = f"-h {HOST} -p {stack.ports['postgres']} -k {folder}"
        pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log")]
        _run(_as_postgres([*pg_ctl, "-o", options, "-w", "-t", "60", "start"]), "pg_ctl start")
    _create_databases(stack)


def _run(args: list[str], what: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, cwd="/")
    if proc.returncode:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ServiceError(f"{what} failed ({proc.returncode}): {last[0]}")


def pg_connect(stack: Stack, db: str = "postgres", user: str = "postgres"):
    import psycopg2

    return psycopg2.connect(
        host=HOST,
        port=stack.ports["postgres"],
        dbname=db,
        user=user,
        password=stack.secrets[f"pg_{user}"],
        connect_timeout=3,
    )


def check_login(stack: Stack, db: str, what: str) -> None:
    """Fail naming ``what`` if ``db``'s owner cannot log in with the stack's password.

    Checked before a server starts on ``db``: MLflow retries a refused login for about 100 s
    before it exits, Prefect for as long as it runs.
    """
    import psycopg2

    owner = "prefect" if db == "prefect" else "mlflow"
    try:
        pg_connect(stack, db, owner).close()
    except psycopg2.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0].strip()
        reason = reason[reason.find("FATAL:") :] if "FATAL:" in reason else reason
        raise ServiceError(
            f"{what}: PostgreSQL at {HOST}:{stack.ports['postgres']} refuses {owner} on "
            f"database {db}: {reason}"
        ) from None


def _pg_ready(stack: Stack) -> bool:
    import psycopg2

    try:
        pg_connect(stack).close()
    except psycopg2.OperationalError:
        return False
    return True


def _create_databases(stack: Stack) -> None:
    """Roles ``mlflow`` and ``prefect``, and their databases; what exists is left as it is."""
    from psycopg2 import sql

    conn = pg_connect(stack)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for role, dbs in (("mlflow", ("mlflow", "mlflow_auth")), ("prefect", ("prefect",))):
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                if not cur.fetchone():
                    cur.execute(
                        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                            sql.Identifier(role), sql.Literal(stack.secrets[f"pg_{role}"])
                        )
                    )
                for db in dbs:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                    if not cur.fetchone():
                        cur.execute(
                            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                                sql.Identifier(db), sql.Identifier(role)
                            )
                        )
    finally:
        conn.close()


def stop_postgres(stack: Stack) -> bool:
    data = stack.path("postgres", "data")
    if not (data / "postmaster.pid").exists():
        return False
    pg_ctl = [str(pg_bindir() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
    subprocess.run(_as_postgres(pg_ctl), capture_output=True, cwd="/")
    return True
