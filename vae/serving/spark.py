"""``vae encode --engine spark``: the same embeddings table, computed by Spark executors.

Spark reads the images (``binaryFile``), a pandas UDF decodes them with
:func:`vae.data.images.decode_image` (the mode conversion and size check of ``vae encode``), and
``mlflow.pyfunc.spark_udf`` runs the model's own ``predict``. The two UDFs are chained, so they
run in one Python worker a task and the pixels never go back to the JVM. The output is a folder
of Parquet parts with :func:`vae.serving.consume.embedding_columns`, in no order; ``source`` is
spelled as ``vae encode`` spells it, so the two tables join. Only the driver reads the MLflow store.

pyspark (the ``spark`` extra) is imported inside functions: ``import vae.serving.spark`` works on
the core install, and a missing pyspark or Java is a one-line :class:`ConsumerError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vae.config import MAX_IMAGE_PIXELS
from vae.data.images import IMAGE_SUFFIXES, InputError, expand_inputs, is_idx
from vae.serving.consume import embedding_columns, load_model
from vae.serving.spark_session import pandas3_accepted, require_spark, spark_session

__all__ = ["InputPlan", "encode_with_spark", "plan_inputs", "spark_session"]

log = logging.getLogger("vae")
# The folder filter: IMAGE_SUFFIXES in any case, as expand_inputs compares suffixes.
_ANY_CASE = ["".join(f"[{c.lower()}{c.upper()}]" for c in s[1:]) for s in IMAGE_SUFFIXES]
GLOB = "*.{" + ",".join(_ANY_CASE) + "}"  # *.{[pP][nN][gG],...}
SPARK_OUTPUT = re.compile(r"^(part-.*|\.part-.*|_SUCCESS|\._SUCCESS\.crc|_temporary)$")
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class InputPlan:
    folders: list[str]  # read recursively, keeping only GLOB
    files: list[str]  # read as given
    roots: list[tuple[str, str]]  # (Spark's "file:/abs/path", the user's spelling of it)
    expected: int | None  # images vae encode would read; None when an input is not local


def plan_inputs(inputs: Sequence[str | Path]) -> InputPlan:
    """Split the inputs into folders and files, checking local ones as ``vae encode`` does.

    Inputs with a scheme (``hdfs://``, ``s3a://``) go to Spark unchecked.
    """
    folders, files, roots, expected = [], [], [], 0
    for raw in inputs:
        text = str(raw)
        if URI.match(text):
            folders.append(text)  # Spark finds out whether it is a folder or a file
            expected = None
            continue
        paths = expand_inputs([text])  # missing input, empty folder: vae encode's message
        idx = [p for p in paths if is_idx(p)]
        if idx:
            raise InputError(
                f"{idx[0]}: IDX files are not supported by --engine spark; "
                "use PNG/JPEG files, or vae encode without --engine spark"
            )
        # Absolute: the JVM resolves a relative path against its own working directory, the
        # one this process had when the JVM started.
        absolute = os.path.abspath(text)
        (folders if Path(text).is_dir() else files).append(absolute)
        roots.append((f"file:{absolute}", str(Path(text))))
        if expected is not None:
            expected += len(paths)
    return InputPlan(folders, files, roots, expected)


def _source_column(roots: list[tuple[str, str]]) -> Any:
    """Spark's ``path`` as ``vae encode`` writes it: ``file:/abs/imgs/a.png`` -> ``imgs/a.png``.

    A folder input ``imgs`` gives ``Path("imgs") / relative``, a file input its own spelling.
    The longest root wins, so nested inputs map to the innermost one.
    """
    from pyspark.sql import functions as F

    path = F.col("path")
    expr = F.regexp_replace(path, "^file:", "")  # local inputs given as file: URIs
    for prefix, user in sorted(roots, key=lambda r: len(r[0])):
        folder = prefix.rstrip("/") + "/"
        lead = "" if user == "." else user.rstrip("/") + "/"  # Path(".") / "a" is "a"
        rest = F.substring(path, len(folder) + 1, 1 << 30)
        expr = F.when(path == prefix, F.lit(user)).otherwise(expr)
        expr = F.when(path.startswith(folder), F.concat(F.lit(lead), rest)).otherwise(expr)
    return expr


def _decode_batches(
    batches: Iterator[tuple[Any, Any]], shape: tuple[int, ...], max_pixels: int
) -> Iterator[Any]:
    """(content, source) pandas batches -> Series of (C*H*W,) float32 0..255 pixel arrays."""
    import numpy as np
    import pandas as pd

    from vae.data.images import decode_image

    for content, source in batches:
        pixels = [
            decode_image(bytes(data), shape, name, max_pixels).reshape(-1).astype(np.float32)
            for data, name in zip(content, source, strict=True)
        ]
        yield pd.Series(pixels, index=content.index, dtype=object)


def _decode_udf(shape: tuple[int, ...], max_pixels: int) -> Any:
    import pandas as pd
    from pyspark.sql.functions import pandas_udf
    from pyspark.sql.types import ArrayType, FloatType

    def decode(batches):  # hints below
        return _decode_batches(batches, shape, max_pixels)

    # pyspark tells a pandas UDF's kind from its hints, and cannot resolve this module's string
    # annotations for a nested function. An iterator UDF, like spark_udf's own, because only
    # UDFs of one kind chain into one Python worker.
    decode.__annotations__ = {
        "batches": Iterator[tuple[pd.Series, pd.Series]],
        "return": Iterator[pd.Series],
    }
    return pandas_udf(decode, ArrayType(FloatType()))


def _predict_udf(spark: Any, model_uri: str) -> Any:
    import mlflow
    from pyspark.sql.types import ArrayType, FloatType

    # spark_udf warns that env_manager="local" does not rebuild the model's environment: here
    # that is the point (the workers must have vae, and the model's pins are vae's own).
    def quiet(record: logging.LogRecord) -> bool:
        return "env_manager=" not in record.getMessage()

    mlflow_log = logging.getLogger("mlflow.pyfunc")
    mlflow_log.addFilter(quiet)
    try:
        return mlflow.pyfunc.spark_udf(
            spark,
            model_uri,
            result_type=ArrayType(FloatType()),
            env_manager="local",
            params={"mode": "encode", "logvar": True, "uint8": True},
        )
    finally:
        mlflow_log.removeFilter(quiet)


def _check_out(out: str) -> None:
    """Overwrite only an earlier Spark output (or an empty folder), never a user's folder."""
    if URI.match(out):
        return  # not local: the write refuses an existing path (mode errorifexists)
    path = Path(out)
    if not path.exists():
        return
    if path.is_dir() and all(SPARK_OUTPUT.match(p.name) for p in path.iterdir()):
        return
    what = "folder" if path.is_dir() else "file"
    raise InputError(
        f"{out}: this {what} exists and is not a Spark output; not overwriting it "
        "(remove it, or pick another --out)"
    )


@contextlib.contextmanager
def _bad_image_as_input_error() -> Iterator[None]:
    """A worker's InputError (a bad image) as its one line, not the JVM's trace around it."""
    try:
        yield
    except Exception as exc:
        found = re.search(r"InputError: (.+)", str(exc))
        if found is None:
            raise
        raise InputError(found.group(1).strip()) from None


def _write(df: Any, out: str) -> None:
    """Write the Parquet folder; a bad image fails the job with the image's one line.

    A local ``out`` is written beside it first and moved into place once the job succeeded,
    as ``vae encode`` writes its file: a failed run leaves an earlier output as it was.
    """
    if URI.match(out):
        with _bad_image_as_input_error():
            df.write.mode("errorifexists").parquet(out)
        return
    path = Path(out).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))  # hidden from Spark
    try:
        with _bad_image_as_input_error():
            df.write.mode("overwrite").parquet(str(tmp))
        if path.exists():  # an earlier Spark output or an empty folder (_check_out)
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_images(spark: Any, plan: InputPlan) -> Any:
    """One DataFrame (path, content) over the folders (filtered) and the files (as given)."""
    frames = []
    if plan.folders:
        opts = {"recursiveFileLookup": "true", "pathGlobFilter": GLOB}
        frames.append(spark.read.format("binaryFile").options(**opts).load(plan.folders))
    if plan.files:
        frames.append(spark.read.format("binaryFile").load(plan.files))
    frames = [f.select("path", "content") for f in frames]
    return frames[0] if len(frames) == 1 else frames[0].unionByName(frames[1])


def encode_with_spark(
    model_uri: str,
    inputs: Sequence[str | Path],
    out: str | Path,
    tracking_uri: str | None,
    master: str = "local[2]",
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """``vae encode`` on Spark: one Parquet row per image in the folder ``out``.

    Returns ``{"rows", "seconds", "rows_per_second"}``; ``seconds`` is the Spark job (read,
    decode, encode, write), as ``vae encode`` times its loop: without the model load or the
    start of Spark.
    """
    require_spark()
    plan = plan_inputs(inputs)
    out = str(out)
    _check_out(out)
    model = load_model(model_uri, tracking_uri)
    names = embedding_columns(model.code_dim)
    spark, owned = spark_session(master)
    try:
        from pyspark.sql import functions as F

        with pandas3_accepted():
            # the folder load_model downloaded: one download, and the version it read
            predict = _predict_udf(spark, str(model.local))
            decode = _decode_udf(model.image_shape, max_pixels)
        df = _read_images(spark, plan).withColumn("source", _source_column(plan.roots))
        df = df.select("source", predict(decode("content", "source")).alias("z"))
        df = df.select("source", *(F.col("z")[i].alias(n) for i, n in enumerate(names[1:])))
        start = time.perf_counter()
        _write(df, out)
        seconds = time.perf_counter() - start
        written = out if URI.match(out) else os.path.abspath(out)  # as plan_inputs, for the JVM
        rows = spark.read.parquet(written).count()  # from the Parquet footers
    finally:
        if owned:
            spark.stop()
    if plan.expected is not None and rows != plan.expected:
        skipped = "it skips files and folders whose names begin with _ or ."
        log.warning("%s: Spark read %d of the %d images: %s", out, rows, plan.expected, skipped)
    return {"rows": rows, "seconds": seconds, "rows_per_second": rows / max(seconds, 1e-9)}
