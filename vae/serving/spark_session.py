"""The SparkSession of ``vae encode --engine spark``: pyspark and Java checked, the conf set.

The executors run this driver's Python (or ``PYSPARK_PYTHON``) on any master, and with
``SPARK_LOCAL_IP`` set the driver binds and advertises that address (a cluster's nodes reach it
there, not at the machine's hostname). pyspark is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vae.serving.consume import ConsumerError

__all__ = ["BATCH_ROWS", "pandas3_accepted", "require_spark", "spark_session"]

BATCH_ROWS = 1024  # Arrow batch = one predict call; below the model's max_rows (10,000)
# Files are packed into tasks by bytes, each counted with this overhead. Spark's default (4 MB)
# makes 32-image tasks of 1 KB PNGs: thousands of tasks, each loading the model again.
OPEN_COST_BYTES = 64 * 1024
# Where the JVM logs a failed task with the worker's whole traceback (three times in local mode);
# the driver's exception carries the same error. Silenced in the sessions that vae starts.
TASK_FAILURE_LOGGERS = (
    "org.apache.spark.executor.Executor",
    "org.apache.spark.scheduler.TaskSetManager",
    "org.apache.spark.util.Utils",
    "org.apache.spark.TaskContextImpl",
    "org.apache.spark.sql.execution.datasources.FileFormatWriter",
    "org.apache.hadoop.mapreduce.lib.output.FileOutputCommitter",
)
INSTALL_SPARK = "pip install 'vae[spark]'"
INSTALL_JAVA = "apt-get install openjdk-17-jre-headless"


@contextlib.contextmanager
def pandas3_accepted() -> Iterator[None]:
    """pyspark 4.3 warns, making a session or a pandas UDF, that it does not fully support
    pandas 3; tests/e2e/test_spark.py checks this engine's output against vae encode's instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "PySpark does not yet fully support", FutureWarning)
        yield


def require_spark() -> None:
    """pyspark and Java 17+, or one line saying what to install."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise ConsumerError(f"--engine spark needs pyspark: {INSTALL_SPARK}") from None
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).is_file():
        raise ConsumerError(f"--engine spark needs Java 17 or later: {INSTALL_JAVA}")
    try:  # `java -version` prints e.g. 'openjdk version "17.0.15" 2025-04-15' on stderr
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
        found = re.search(r'version "(?:1\.)?(\d+)', out.stderr)
    except (OSError, subprocess.TimeoutExpired):
        found = None
    if found is None or int(found.group(1)) < 17:
        seen = found.group(1) if found else "unknown"
        raise ConsumerError(
            f"--engine spark needs Java 17 or later ({java} is {seen}): {INSTALL_JAVA}"
        )


def _cluster_conf() -> dict[str, str]:
    """The driver's address for any master: with ``SPARK_LOCAL_IP`` set, the driver binds and
    advertises that address, so executors connect back to it, not to the machine's hostname."""
    host = os.environ.get("SPARK_LOCAL_IP")
    return {"spark.driver.host": host, "spark.driver.bindAddress": host} if host else {}


@contextlib.contextmanager
def _executors_python() -> Iterator[None]:
    """Executors run ``PYSPARK_PYTHON`` if the user set it, else this driver's interpreter (the
    venv with vae and torch; a cluster's nodes install it at the same path), not PATH's
    ``python3``. pyspark 4.3 reads the variable once, as the SparkContext is made, into the
    functions it ships (``spark.pyspark.python`` does not reach a pandas UDF's workers)."""
    if os.environ.get("PYSPARK_PYTHON"):
        yield
        return
    os.environ["PYSPARK_PYTHON"] = sys.executable
    try:
        yield
    finally:
        os.environ.pop("PYSPARK_PYTHON", None)


def spark_session(master: str = "local[2]") -> tuple[Any, bool]:
    """The active SparkSession if there is one (a notebook's, spark-submit's), else a new one on
    ``master``; and whether the caller owns it (and should stop it)."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    builder = SparkSession.builder.appName("vae-encode")
    conf = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": str(sys.stderr.isatty()).lower(),
        "spark.sql.shuffle.partitions": "4",  # nothing shuffles; keep any accident small
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(BATCH_ROWS),
        "spark.sql.files.openCostInBytes": str(OPEN_COST_BYTES),
    }
    python = contextlib.nullcontext()
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not under spark-submit, whose flags decide
        builder = builder.master(master)
        conf.update(_cluster_conf())
        python = _executors_python()
    for key, value in conf.items():
        builder = builder.config(key, value)
    with pandas3_accepted(), python:
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    jvm = spark.sparkContext._jvm
    for name in TASK_FAILURE_LOGGERS:
        off = jvm.org.apache.logging.log4j.Level.OFF
        jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(name, off)
    logging.getLogger("py4j").setLevel(logging.WARNING)  # not "Closing down clientserver ..."
    return spark, True
