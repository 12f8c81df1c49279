"""A Spark standalone cluster for batch scoring: one master and N workers, on 127.0.0.1.

pyspark's wheel ships ``bin/spark-class`` (not ``sbin/``), so the master and each worker are
``spark-class org.apache.spark.deploy.{master.Master,worker.Worker}``, started in sessions of
their own with ``SPARK_LOCAL_IP=127.0.0.1`` and ``--host 127.0.0.1``: they bind and advertise
that address, not the machine's. Ports are chosen on the first start and kept in
``STATE/spark/cluster.json``; ``vae encode --engine spark --master <url>`` then scores on it.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vae.mlops.team.procs import (
    ServiceError,
    ensure_ports_free,
    running,
    start,
    stop,
    wait_until,
)
from vae.mlops.team.state import HOST, free_ports

__all__ = ["Cluster", "alive_workers", "load_cluster", "start_cluster", "stop_cluster"]

MASTER = "org.apache.spark.deploy.master.Master"
WORKER = "org.apache.spark.deploy.worker.Worker"


@dataclass(frozen=True)
class Cluster:
    """Where a cluster's state lives, its ports, and its workers' size."""

    folder: Path
    ports: dict[str, int]  # master, master_ui, worker-<i>, worker-<i>_ui
    workers: int
    cores: int
    memory: str

    @property
    def url(self) -> str:
        return f"spark://{HOST}:{self.ports['master']}"

    @property
    def ui(self) -> str:
        return f"http://{HOST}:{self.ports['master_ui']}"


def load_cluster(
    state: str | Path, workers: int = 2, cores: int = 1, memory: str = "2g"
) -> Cluster:
    """The cluster of ``STATE/spark``: read back, or created with free ports."""
    folder = Path(state).absolute() / "spark"
    record = folder / "cluster.json"
    if record.is_file():
        data = json.loads(record.read_text())
        return Cluster(folder, data["ports"], data["workers"], data["cores"], data["memory"])
    folder.mkdir(parents=True, exist_ok=True)
    names = ["master", "master_ui"]
    names += [f"worker-{i}{suffix}" for i in range(workers) for suffix in ("", "_ui")]
    ports = free_ports(names)
    cluster = Cluster(folder, ports, workers, cores, memory)
    body = {"ports": ports, "workers": workers, "cores": cores, "memory": memory}
    record.write_text(json.dumps(body, indent=1))
    return cluster


def _spark_class() -> str:
    try:
        import pyspark
    except ImportError:
        raise ServiceError("pyspark is not installed: pip install 'vae[spark]'") from None
    return str(Path(pyspark.__file__).parent / "bin" / "spark-class")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "SPARK_"))}
    env["SPARK_LOCAL_IP"] = HOST  # bind and advertise 127.0.0.1, not the machine's address
    env["PYSPARK_PYTHON"] = sys.executable  # a worker's default Python for the executors
    return env


def alive_workers(cluster: Cluster) -> int:
    """How many workers the master counts ALIVE (its web UI's JSON), 0 if it does not answer."""
    try:
        with urllib.request.urlopen(f"{cluster.ui}/json/", timeout=3) as resp:
            data = json.load(resp)
    except (OSError, ValueError):
        return 0
    return sum(w.get("state") == "ALIVE" for w in data.get("workers", []))


def start_cluster(cluster: Cluster) -> None:
    """Start what is not running (master, then the workers) and wait until all are ALIVE."""
    state, p = cluster.folder, cluster.ports
    if running(state, "master") is None:
        ensure_ports_free("the Spark master", HOST, [p["master"], p["master_ui"]])
        args = [_spark_class(), MASTER, "--host", HOST, "--port", str(p["master"])]
        args += ["--webui-port", str(p["master_ui"])]
        # no REST submission server: its fixed port 6066 would clash, and nothing uses it
        env = {**_env(), "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false"}
        start(state, "master", args, env, state)
    wait_until(lambda: _answers(cluster), "the Spark master", 90, state, "master")
    for i in range(cluster.workers):
        name = f"worker-{i}"
        if running(state, name) is None:
            port, ui = p[name], p[f"{name}_ui"]
            ensure_ports_free(f"Spark {name}", HOST, [port, ui])
            args = [_spark_class(), WORKER, cluster.url, "--host", HOST, "--port", str(port)]
            args += ["--webui-port", str(ui), "--cores", str(cluster.cores)]
            args += ["--memory", cluster.memory, "--work-dir", str(state / f"{name}-work")]
            start(state, name, args, _env(), state)
    wait_until(
        lambda: alive_workers(cluster) >= cluster.workers,
        f"{cluster.workers} Spark workers",
        120,
        state,
        "master",
    )


def _answers(cluster: Cluster) -> bool:
    try:
        with urllib.request.urlopen(f"{cluster.ui}/json/", timeout=3) as resp:
            return resp.status == 200
    except OSError:
        return False


def stop_cluster(cluster: Cluster) -> list[str]:
    """Stop the workers, then the master; the names of those that ran."""
    names = [f"worker-{i}" for i in range(cluster.workers)] + ["master"]
    return [name for name in names if stop(cluster.folder, name, grace=10)]
