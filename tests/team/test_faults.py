"""Faults of the team's store: the object store killed in the middle of ``dvc push``, PostgreSQL
restarted during ``vae register``, wrong S3 keys, a missing bucket, a dead tracking server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import dvc, run
from tests.team.conftest import TeamProject, add_s3_keys, start_register

pytestmark = [pytest.mark.team, pytest.mark.slow]
BLOBS = 120


def _objects(stack, prefix: str) -> list[str]:
    from vae.mlops.team.services import s3_client

    page = s3_client(stack).list_objects_v2(Bucket="dvc", Prefix=prefix)
    return [o["Key"] for o in page.get("Contents", [])]


def test_object_store_killed_mid_push_then_a_second_push_completes(
    team_project: TeamProject,
) -> None:
    from vae.mlops.team.__main__ import service_pid
    from vae.mlops.team.services import start_service

    root, stack = team_project.root, team_project.stack
    env = team_project.env("writer")
    blobs = root / "blobs"  # small files, one at a time (-j 1): a push of seconds
    blobs.mkdir()
    for i in range(BLOBS):
        (blobs / f"{i:03}.bin").write_bytes(os.urandom(2048))
    dvc(root, "add", "blobs", env=env)
    prefix = f"mid-push-{uuid.uuid4().hex[:8]}"
    dvc(root, "remote", "add", "-f", "midpush", f"s3://dvc/{prefix}", env=env)
    for key, value in (("endpointurl", stack.s3_url), ("connect_timeout", "5")):
        dvc(root, "remote", "modify", "midpush", key, value, env=env)
    # the keys from the environment, as env/s3.env gives them: no config.local entry of a
    # remote that the cleanup's `git checkout` removes again
    env = {**env, **stack.dvc_env()}
    cache_before = sorted(p.name for p in (root / ".dvc" / "cache").rglob("*") if p.is_file())
    push = subprocess.Popen(
        [sys.executable, "-m", "dvc", "push", "-r", "midpush", "-j", "1"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(push.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 120
        while not _objects(stack, prefix) and time.time() < deadline and push.poll() is None:
            time.sleep(0.05)
        landed = len(_objects(stack, prefix))
        assert landed, "nothing landed before the push ended"
        os.killpg(service_pid(stack, "s3"), signal.SIGKILL)
        deadline = time.time() + 120  # the push notices: a transfer fails
        while not any("failed to transfer" in line for line in lines) and time.time() < deadline:
            time.sleep(0.1)
    finally:
        start_service(stack, "s3")  # started again while the push goes on
    push.wait(timeout=300)
    reader.join(10)
    out = "".join(lines)
    assert push.returncode != 0, out
    print(f"dvc push, the store killed after {landed} objects (exit {push.returncode}):")
    print("\n".join(dict.fromkeys(out.splitlines()[-4:])))
    # DVC's own words: "failed to push data to the cloud - N files failed to upload" when
    # single transfers failed, "unexpected error - Could not connect to the endpoint URL" when
    # the store went while DVC was reading the remote's index
    assert "failed to push data to the cloud" in out or "Could not connect" in out, out
    cache_after = sorted(p.name for p in (root / ".dvc" / "cache").rglob("*") if p.is_file())
    assert cache_after == cache_before  # nothing in the local cache is lost
    again = dvc(root, "push", "-r", "midpush", env=env)
    failed = re.search(r"(\d+) files? failed to upload", out)
    if failed:  # the second push sends exactly what had failed
        assert re.search(rf"\b{failed.group(1)} files? pushed", again), again
    status = dvc(root, "status", "-c", "-r", "midpush", env=env)
    assert "in sync" in status, status
    assert len(_objects(stack, prefix)) >= BLOBS
    run(root, "git", "checkout", "--", ".")  # the remote and .gitignore as they were
    shutil.rmtree(blobs)
    (root / "blobs.dvc").unlink()


def test_postgres_restarted_during_register(team_project: TeamProject) -> None:
    """Exit 0 or 75, never a champion without its files; the rerun completes."""
    from vae.mlops.team.postgres import pg_bindir
    from vae.mlops.team.services import start_service

    root, stack = team_project.root, team_project.stack
    env = team_project.env("writer")
    proc = start_register(root, env)
    time.sleep(8)  # inside: logging the model, registering, tagging
    data = stack.path("postgres", "data")
    pg_ctl = [str(pg_bindir() / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*as_postgres, *pg_ctl], check=True, capture_output=True, cwd="/")
    time.sleep(3)
    start_service(stack, "postgres")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode in (0, 75), err
    if proc.returncode:
        lines = [line for line in err.strip().splitlines() if "error" in line.lower()]
        assert lines and "Traceback" not in err, err
    _champion_loads(team_project, tmp=root / "reload")
    rerun = subprocess.run(
        [sys.executable, "-m", "vae", "register"], cwd=root, env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    _champion_loads(team_project, tmp=root / "reload2")
    json.loads((root / "metrics" / "registry.json").read_text())


def _champion_loads(project: TeamProject, tmp: Path) -> None:
    uri = f"models:/{project.model}@champion"
    images = next(project.raw.glob("t10k-images*"))
    out = tmp / "codes.parquet"
    tmp.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "vae", "encode", "--model", uri, str(images), "--out", str(out)],
        cwd=tmp,
        env=project.env("reader"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_health_checks_name_wrong_keys_and_a_missing_bucket(team_stack) -> None:
    from vae.mlops.team.procs import ServiceError
    from vae.mlops.team.services import check_buckets

    check_buckets(team_stack)
    with pytest.raises(ServiceError, match="refuses the S3 keys"):
        check_buckets(team_stack, key=team_stack.secrets["s3_key"], secret="not-the-secret")
    with pytest.raises(ServiceError, match="no bucket 'no-such-bucket'"):
        check_buckets(team_stack, buckets=("no-such-bucket",))


def test_dvc_with_wrong_keys_fails_with_dvcs_message(
    team_project: TeamProject, tmp_path: Path
) -> None:
    root = team_project.root
    env = team_project.env("writer")
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "pull", "-r", "team"],
        cwd=root,
        env={**env, "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    # the keys in .dvc/config.local win over the environment: a pull with them works
    assert proc.returncode == 0, proc.stderr
    dvc(root, "remote", "modify", "--local", "team", "secret_access_key", "wrong-secret")
    try:
        started = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "push", "-r", "team"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        add_s3_keys(root, team_project.stack, env)
    print(f"dvc push with a wrong secret (exit {proc.returncode}):\n{proc.stderr}")
    assert proc.returncode != 0
    assert time.time() - started < 60
    assert (
        "403" in proc.stderr
        or "forbidden" in proc.stderr.lower()
        or "denied" in proc.stderr.lower()
    )
