"""``vae encode --engine spark`` on a standalone cluster: a master and two one-core workers that
the project starts on 127.0.0.1 (``vae.mlops.team.spark``), as a team's cluster would run them.

The images and the model are on a path every node reads (one machine: its disk); the driver,
the master, the workers, their executors and Python workers all bind 127.0.0.1, and ``ss -tnp``
shows no connection of theirs leaving 127.0.0.0/8.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from tests.e2e.test_spark import JAVA, make_store
from tests.team.conftest import outside_loopback, process_tree

pytestmark = [
    pytest.mark.team,
    pytest.mark.slow,
    pytest.mark.skipif(JAVA is None, reason="no Java: `make java` installs it"),
]
N_IMAGES = 3000
# about 40 tasks of 75 images: a worker lost mid-job leaves work for the other one
SPARK_ARGS = "--conf spark.sql.files.maxPartitionBytes=5000000 pyspark-shell"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """``python -m vae.mlops.team spark-up`` (what ``make spark-up`` runs), then spark-down."""
    from vae.mlops.team.spark import load_cluster

    state = tmp_path_factory.mktemp("cluster")
    team = [sys.executable, "-m", "vae.mlops.team"]
    up = subprocess.run([*team, "spark-up", "--state", str(state)], capture_output=True, text=True)
    print(up.stdout.strip())
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        yield load_cluster(state)
    finally:
        down = subprocess.run([*team, "spark-down", "--state", str(state)], capture_output=True)
        # "stopped: worker-0, master": worker-1 is gone once the lost-worker test killed it
        assert down.stdout.decode().strip().endswith(", master")
        assert not _services(load_cluster(state))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    return make_store(tmp_path_factory.mktemp("spark-cluster"), N_IMAGES)


def _encode(store: tuple[Path, str, str], out: Path, *engine: str) -> subprocess.Popen:
    root, uri, model_uri = store
    cmd = [sys.executable, "-m", "vae", "-q", "encode", "--model", model_uri]
    cmd += ["--tracking-uri", uri, *engine, "imgs", "--out", str(out)]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_SUBMIT_ARGS": SPARK_ARGS}
    env.pop("PYSPARK_PYTHON", None)  # the executors' Python must come by itself,
    venv = str(Path(sys.executable).parent)  # not from PATH's python3
    env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if d != venv)
    return subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _done(proc: subprocess.Popen, timeout: float = 600) -> None:
    _out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path).sort_values("source").reset_index(drop=True)


def _services(cluster: object) -> dict[str, int]:
    """The pids of the cluster's master and workers that run, by name."""
    from vae.mlops.team.procs import running

    names = ["master"] + [f"worker-{i}" for i in range(cluster.workers)]
    return {n: pid for n in names if (pid := running(cluster.folder, n))}


@pytest.fixture(scope="module")
def local(store: tuple[Path, str, str]) -> pd.DataFrame:
    """What ``vae encode`` (the local engine) writes for ``imgs/``."""
    out = store[0] / "local.parquet"
    _done(_encode(store, out, "--no-progress"))
    return _table(out)


def _rss(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 2**20


def test_the_cluster_writes_the_local_table_to_the_last_float(
    cluster: object, store: tuple[Path, str, str], local: pd.DataFrame
) -> None:
    root = store[0]
    _done(_encode(store, root / "local2", "--engine", "spark", "--master", "local[2]"))
    print("idle:", {n: f"{_rss(process_tree([p])):.0f} MiB" for n, p in _services(cluster).items()})
    job = _encode(store, root / "standalone", "--engine", "spark", "--master", cluster.url)
    bad, peak = [], 0.0
    while job.poll() is None:
        services = list(_services(cluster).values())
        bad += outside_loopback(process_tree([job.pid, *services]))
        peak = max(peak, _rss(process_tree(services)))
        time.sleep(0.5)
    _done(job)
    print(f"cluster peak during the job (master, workers, executors, Python): {peak:.0f} MiB")
    assert not bad, bad
    standalone = _table(root / "standalone")
    assert len(standalone) == N_IMAGES
    assert standalone["source"].tolist() == local["source"].tolist()
    np.testing.assert_array_equal(standalone.iloc[:, 1:], local.iloc[:, 1:])
    np.testing.assert_array_equal(_table(root / "local2").iloc[:, 1:], local.iloc[:, 1:])


def test_a_worker_lost_mid_job_leaves_the_table_complete(
    cluster: object, store: tuple[Path, str, str], local: pd.DataFrame
) -> None:
    root = store[0]
    out = root / "lost-worker"
    job = _encode(store, out, "--engine", "spark", "--master", cluster.url)
    deadline = time.monotonic() + 300
    # vae encode writes into a hidden folder beside --out; wait until a task has committed
    while not list(root.glob(f".{out.name}.*/_temporary/0/task_*")):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-2000:]
        time.sleep(0.2)
    lost = _services(cluster)["worker-1"]
    os.killpg(lost, signal.SIGKILL)  # the worker, its executor and its Python workers
    killed = time.monotonic()
    _done(job)
    print(f"job done {time.monotonic() - killed:.1f} s after worker-1 was killed")
    table = _table(out)
    assert len(table) == N_IMAGES and table["source"].is_unique
    np.testing.assert_array_equal(table.iloc[:, 1:], local.iloc[:, 1:])
