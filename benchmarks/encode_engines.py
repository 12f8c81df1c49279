"""``vae encode``: the local engine against Spark local[1], local[2] and a standalone cluster.

    python benchmarks/encode_engines.py --model models:/vae-fashion-mnist@champion \\
        --tracking-uri sqlite:///$PWD/mlflow.db --pngs /tmp/fashion-mnist-png
    python benchmarks/encode_engines.py ... --limit 2000     # a quick check, ~2 minutes
    python benchmarks/encode_engines.py ... --standalone     # also a 2-worker cluster

First the Fashion-MNIST images (train then test, 70,000; the first ``--limit`` with it) are
written as PNG files under ``--pngs`` (``train/00000.png``, ..., ``test/09999.png``), unless
they are there already. Then each engine encodes that folder in its own child process, one
after another:

- ``local``: ``vae encode`` (one process, batches of 512);
- ``spark local[1]`` and ``spark local[2]``: ``vae encode --engine spark --master local[N]``
  (the driver, its JVM, and N Python workers running the decode and model UDFs).
- with ``--standalone``, ``spark standalone 2x1``: a standalone master and two workers of one
  core each (``vae.mlops.team.spark``, on 127.0.0.1), started before and stopped after; its peak
  RSS adds the master's, the workers' and their executors' trees to the driver's.

Columns:

- ``wall s``: the child process from start to exit: Python and Spark start-up, the model
  load, the job and the exit. ``rows/s`` divides the rows by it.
- ``job s``: the command's own timing (its log line): the loop over the images for ``local``,
  the Spark job (read, decode, encode, write) for Spark; start-ups and the model load are out.
- ``peak RSS``: the largest sum of resident set sizes over the child's whole process tree (the
  JVM and the Python workers count), sampled every 0.1 s with psutil. Pages that forked workers
  share are counted once per process, so this over-counts a little; a peak shorter than 0.1 s
  can be missed.
- ``max |diff|``: the largest absolute difference of any ``mu``/``logvar`` value from the local
  engine's, rows matched by ``source``: the engines must agree, not only be fast.

The outputs go to a temporary folder and are deleted. ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

DATASET = Path("/usr/share/datasets/fashion-mnist")
SPLITS = (("train", "train-images-idx3-ubyte.gz"), ("test", "t10k-images-idx3-ubyte.gz"))
ENGINES = [("local", [])] + [
    (f"spark local[{n}]", ["--engine", "spark", "--master", f"local[{n}]"]) for n in (1, 2)
]
LOG_LINE = re.compile(r": (\d+) rows in [\d.]+ s \((\d+) rows/s\)")  # vae encode's last line
MIB = 2**20


def _idx_images(path: Path) -> np.ndarray:
    """(N, 28, 28) uint8 from a gzipped IDX image file."""
    data = gzip.decompress(path.read_bytes())
    n, h, w = (int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
    return np.frombuffer(data, np.uint8, count=n * h * w, offset=16).reshape(n, h, w)


def write_pngs(dataset: Path, out: Path, limit: int | None) -> int:
    """The first ``limit`` images (all without it) as PNG files; returns how many.

    Files already there are kept, so a second run writes nothing. A folder holding more PNG
    files than this run wants is refused: every engine would encode them all.
    """
    from PIL import Image

    wanted: list[tuple[Path, np.ndarray]] = []
    for split, name in SPLITS:
        images = _idx_images(dataset / name)
        for i in range(len(images)):
            if limit is not None and len(wanted) == limit:
                break
            wanted.append((out / split / f"{i:05d}.png", images[i]))
    found = sum(1 for _ in out.rglob("*.png")) if out.is_dir() else 0
    if found > len(wanted):
        raise SystemExit(f"{out}: holds {found} PNG files, this run wants {len(wanted)}")
    written = 0
    for path, pixels in wanted:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            written += 1
    print(f"{out}: {len(wanted)} PNG files ({written} written now)", file=sys.stderr)
    return len(wanted)


def _tree_rss(root: Any) -> tuple[int, int]:
    """The summed RSS of ``root`` and all its descendants, and how many processes that is."""
    import psutil

    total, count = 0, 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
            count += 1
        except psutil.NoSuchProcess:  # exited between the listing and the read
            continue
    return total, count


def run_engine(cmd: list[str], env: dict[str, str], also: tuple[int, ...] = ()) -> dict[str, Any]:
    """Run one ``vae encode`` child; its wall time, peak tree RSS (with the trees of the pids
    ``also``: a cluster's services), and the rows it logged."""
    import psutil

    peak = {"rss": 0, "procs": 0}
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root = psutil.Process(child.pid)
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.extend(child.stdout or []), daemon=True)
    reader.start()
    others = [psutil.Process(pid) for pid in also]
    while child.poll() is None:
        trees = [_tree_rss(p) for p in (root, *others)]
        rss, count = sum(t[0] for t in trees), sum(t[1] for t in trees)
        peak["rss"], peak["procs"] = max(peak["rss"], rss), max(peak["procs"], count)
        time.sleep(0.1)
    wall = time.perf_counter() - start
    reader.join()
    text = b"".join(output).decode(errors="replace")
    found = LOG_LINE.search(text)
    if child.returncode != 0 or found is None:
        raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}):\n{text[-3000:]}")
    rows, rate = int(found.group(1)), float(found.group(2))  # the rate: more digits than "s"
    return {
        "rows": rows,
        "wall_s": wall,
        "rows_per_s_wall": rows / wall,
        "job_s": rows / max(rate, 1e-9),
        "rows_per_s_job": rate,
        "peak_rss_bytes": peak["rss"],
        "max_processes": peak["procs"],
    }


def _max_diff(local: Path, other: Path) -> float:
    import pandas as pd

    a = pd.read_parquet(local).sort_values("source").reset_index(drop=True)
    b = pd.read_parquet(other).sort_values("source").reset_index(drop=True)
    if a["source"].tolist() != b["source"].tolist():
        raise SystemExit(f"{other}: not the same images as {local}")
    return float(np.abs(a.iloc[:, 1:].to_numpy() - b.iloc[:, 1:].to_numpy()).max())


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| engine | rows | wall s | rows/s | job s | rows/s (job) | peak RSS | processes "
        "| max \\|diff\\| |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {r['rows']:,} | {r['wall_s']:.1f} | {r['rows_per_s_wall']:,.0f} "
            f"| {r['job_s']:.1f} | {r['rows_per_s_job']:,.0f} | {r['peak_rss_bytes'] / MIB:,.0f} "
            f"MiB | {r['max_processes']} | {r['max_diff']:.1e} |"
        )
    return "\n".join(lines)


def _engines(tmp: Path, standalone: bool) -> Any:
    """(name, extra args, the pids to count besides the child's) per engine, in order; the
    cluster runs only while its engine does."""
    for name, extra in ENGINES:
        yield name, extra, tuple
    if not standalone:
        return
    from vae.mlops.team.procs import running
    from vae.mlops.team.spark import load_cluster, start_cluster, stop_cluster

    cluster = load_cluster(tmp / "cluster", workers=2, cores=1, memory="2g")
    start_cluster(cluster)
    names = ["master", "worker-0", "worker-1"]
    try:
        pids = tuple(pid for n in names if (pid := running(cluster.folder, n)))
        yield "spark standalone 2x1", ["--engine", "spark", "--master", cluster.url], lambda: pids
    finally:
        stop_cluster(cluster)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the model URI (models:/NAME@ALIAS, ...)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--pngs", required=True, type=Path, help="the PNG folder (made if missing)")
    p.add_argument("--limit", type=int, help="only the first N images (default: all 70,000)")
    p.add_argument("--dataset", type=Path, default=DATASET, help="the IDX files' folder")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--standalone", action="store_true", help="also a 2-worker Spark cluster")
    args = p.parse_args(argv)
    if not args.tracking_uri and args.model.startswith(("models:/", "runs:/")):
        p.error("--tracking-uri (or MLFLOW_TRACKING_URI) is needed for this model URI")

    n = write_pngs(args.dataset, args.pngs.resolve(), args.limit)
    env = {**os.environ, "DO_NOT_TRACK": "1", "SPARK_LOCAL_IP": "127.0.0.1"}
    if args.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = args.tracking_uri
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="encode-engines-") as tmp:
        outs = []
        for name, extra, also in _engines(Path(tmp), args.standalone):
            out = Path(tmp) / name.replace(" ", "-").replace("[", "").replace("]", "")
            cmd = [sys.executable, "-m", "vae", "encode", "--model", args.model, "--no-progress",
                   *extra, str(args.pngs.resolve()), "--out", str(out)]  # fmt: skip
            print(f"{name}: {n} images ...", file=sys.stderr, flush=True)
            rows.append({"engine": name, **run_engine(cmd, env, also())})
            outs.append(out)
        for row, out in zip(rows, outs, strict=True):
            row["max_diff"] = _max_diff(outs[0], out)
    machine = f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"{machine}; {n:,} Fashion-MNIST PNGs; model {args.model}\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "images": n, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
