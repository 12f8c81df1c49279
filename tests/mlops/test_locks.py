"""One registration at a time: the file lock of ``vae register`` (vae/locks.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import project_env, subprocess_env
from tests.mlops.mlflow_helpers import NAME, make_project, run_pipeline
from vae.locks import LockTimeout, file_lock, registry_lock_path

HOLD = (
    "import sys, time; from vae.locks import file_lock\n"
    "with file_lock(sys.argv[1], 5, 'test'):\n"
    "    print('held', flush=True); time.sleep(300)\n"
)


def _holder(path: Path) -> subprocess.Popen[str]:
    """Another process that holds the lock at ``path`` until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_killed_holder_frees_the_lock_at_once(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    holder = _holder(path)
    try:
        held = pytest.raises(LockTimeout, match=r"registering m: .*x\.lock is held by pid \d+")
        with held, file_lock(path, 0.3, "registering m"):
            pass
    finally:
        holder.kill()
        holder.wait()
    start = time.monotonic()
    with file_lock(path, 5, "registering m"):
        assert time.monotonic() - start < 1.0


def test_lock_paths_follow_the_store() -> None:
    sqlite = registry_lock_path("sqlite:////srv/proj/mlflow.db", "m")
    assert sqlite == Path("/srv/proj/mlflow.db.register-m.lock")
    a = registry_lock_path("http://mlflow.internal:5000", "m")
    assert a.parent == Path(__import__("tempfile").gettempdir())
    assert a != registry_lock_path("http://mlflow.internal:5000", "other")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = make_project(tmp_path_factory.mktemp("locks"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_pipeline(root, uri, ["prepare", "train", "evaluate"])
    return root, uri


def _versions(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    return len(MlflowClient(tracking_uri=uri).search_model_versions(f"name = '{NAME}'"))


@pytest.mark.slow
def test_register_waits_for_the_store_lock(trained: tuple[Path, str]) -> None:
    root, uri = trained
    lock = registry_lock_path(uri, NAME)
    assert lock.parent == root
    before = _versions(uri)
    holder = _holder(lock)
    try:
        env = subprocess_env(MLFLOW_TRACKING_URI=uri)
        vae = [sys.executable, "-m", "vae", "-q", "register"]
        proc = subprocess.Popen(vae, cwd=root, env=env, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        # It logs the model first, then says that it waits at the lock.
        lines = iter(proc.stderr.readline, "")
        said = next((line for line in lines if "waiting up to" in line), "")
        assert str(lock) in said, proc.stderr.read()
        assert proc.poll() is None
        assert _versions(uri) == before, "registered while another process held the lock"
    finally:
        holder.kill()
        holder.wait()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert _versions(uri) == before + 1


@pytest.mark.slow
def test_a_lock_held_too_long_exits_75(
    trained: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import vae.mlops.registry
    from vae.cli import main
    from vae.errors import EXIT_TEMPFAIL

    root, uri = trained
    monkeypatch.setattr(vae.mlops.registry, "REGISTER_LOCK_TIMEOUT", 0.5)
    before = _versions(uri)
    holder = _holder(registry_lock_path(uri, NAME))
    try:
        with project_env(root, uri):
            assert main(["-q", "register"]) == EXIT_TEMPFAIL == 75  # retryable
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"registering {NAME}: " in err and "try again later" in err
    assert _versions(uri) == before


@pytest.mark.parametrize("command", ["train", "evaluate", "export", "generate", "register"])
def test_a_second_writer_in_the_workspace_refuses_at_once(
    project: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """While another process writes here, each writing stage exits 75 at once, writing nothing;
    once that process is killed (SIGKILL: no clean-up), the lock is free."""
    from vae.cli import main
    from vae.locks import WRITER_LOCK

    before = sorted(p.name for p in project.iterdir())
    holder = _holder(project / WRITER_LOCK)
    try:
        start = time.monotonic()
        assert main([command]) == 75
        assert time.monotonic() - start < 5
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{WRITER_LOCK} is held by pid {holder.pid}" in err, err
        assert sorted(p.name for p in project.iterdir()) == sorted([*before, WRITER_LOCK.name])
    finally:
        holder.kill()
        holder.wait()
    with file_lock(project / WRITER_LOCK, 0.0, "after the kill"):
        pass


def test_a_server_without_a_prefect_api_warns_once_that_the_lock_is_this_machines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import vae.locks

    monkeypatch.setattr(vae.locks, "prefect_api_url", lambda: None)
    monkeypatch.setattr(vae.locks, "_warned", set())
    monkeypatch.setattr(vae.locks.tempfile, "gettempdir", lambda: str(tmp_path))
    uri = "http://mlflow.example:5000"
    with caplog.at_level("WARNING", logger="vae.locks"):
        for _ in range(2):
            with vae.locks.registry_lock(uri, "m", 1.0):
                assert list(tmp_path.glob("vae-register-*.lock"))  # a file lock on this machine
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "registering m: no Prefect API configured (PREFECT_API_URL), so registrations are "
        "serialised on this machine only"
    ]
    caplog.clear()
    sqlite = vae.locks.registry_lock(f"sqlite:///{tmp_path / 'mlflow.db'}", "n", 1.0)
    with caplog.at_level("WARNING", logger="vae.locks"), sqlite:
        assert (tmp_path / "mlflow.db.register-n.lock").exists()  # beside the database
    assert not caplog.records  # SQLite is one machine's by nature: nothing to warn about


def test_the_prefect_api_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from vae.locks import prefect_api_url

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert prefect_api_url() == "http://127.0.0.1:4200/api"


def test_a_prefect_api_failing_to_grant_the_slot_is_a_lock_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL restarting behind Prefect: the slot request fails with a 500, which Prefect
    raises as ConcurrencySlotAcquisitionError. That is exit 75 in one line, not a traceback."""
    import prefect.concurrency.sync
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError

    import vae.locks
    from vae.errors import exit_code

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConcurrencySlotAcquisitionError("Unable to acquire concurrency slots: 500")

    monkeypatch.setattr(vae.locks, "ensure_limit", lambda name: None)
    monkeypatch.setattr(prefect.concurrency.sync, "concurrency", refuse)
    with (
        pytest.raises(LockTimeout, match=r"registering m: the Prefect API .* try again") as info,
        vae.locks.global_lock("vae-register-m", 5, "registering m"),
    ):
        raise AssertionError("the block must not run")
    assert exit_code(info.value) == 75
