"""The wall time Prefect adds over running the same DVC stages directly, in one run.

    python benchmarks/prefect_overhead.py            # tiny synthetic data, ~4 minutes on 2 cores

Three fresh, identical tiny projects (a git + DVC repo each, the synthetic IDX data and tiny
params of tests/conftest.py, MLflow on, each with its own ``mlflow.db``) run the whole pipeline:

(a) ``dvc repro``: one DVC process for all stages;
(b) ``dvc repro -s <stage>`` once per stage, in the order the flows use, without Prefect;
(c) the ``vae-pipeline`` flow: (b), one Prefect task each, against a temporary Prefect server
    that is started (and timed) before the flow.

(c) - (b) is what Prefect itself adds; (b) - (a) is what one DVC process per stage adds. A
fourth project then runs ``vae-retrain`` twice: the first run trains and promotes, the second
finds the data unchanged and skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_project(root: Path) -> Path:
    from tests.conftest import make_dvc_project, write_idx_dataset

    source = write_idx_dataset(root.parent / f"{root.name}-source", n_train=200, n_test=50)
    mlflow = {"enabled": True, "experiment": "tiny", "registered_model": "tiny-vae"}
    return make_dvc_project(root, source, mlflow=mlflow)


def env(root: Path) -> dict[str, str]:
    from pipelines.tasks import project_env

    return project_env(root)


def timed(label: str, fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s", flush=True)
    return seconds


def dvc(root: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "dvc", *args]
    subprocess.run(cmd, cwd=root, env=env(root), check=True, capture_output=True)


def main() -> None:
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # each project: its own mlflow.db
    tmp = Path(tempfile.mkdtemp(prefix="prefect_overhead_"))
    os.environ.update(
        PREFECT_HOME=str(tmp / "prefect_home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    from pipelines.flows import stage_order, vae_pipeline, vae_retrain

    stages = stage_order(ROOT)
    a, b, c, d = (make_project(tmp / name) for name in "abcd")
    print(f"stages: {stages}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    t_a = timed("(a) dvc repro", lambda: dvc(a, "repro"))
    t_b = timed(
        "(b) dvc repro -s <stage>, per stage", lambda: [dvc(b, "repro", "-s", s) for s in stages]
    )
    from prefect.testing.utilities import prefect_test_harness

    start = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=120):
        print(f"    temporary Prefect server started in {time.perf_counter() - start:.1f} s")
        t_c = timed("(c) vae-pipeline flow", lambda: vae_pipeline(root=str(c)))
        for i in (1, 2):
            start = time.perf_counter()
            r = vae_retrain(root=str(d))
            print(
                f"vae-retrain #{i}: {r['status']} in {time.perf_counter() - start:.1f} s; "
                f"champion v{r['champion_version']}: {r['reason']}"
            )
    print(f"Prefect over per-stage DVC (c - b): {t_c - t_b:+.1f} s ({(t_c / t_b - 1):+.0%})")
    print(f"per-stage DVC over one dvc repro (b - a): {t_b - t_a:+.1f} s")
    print(f"vae-pipeline flow over dvc repro (c - a): {t_c - t_a:+.1f} s ({(t_c / t_a - 1):+.0%})")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
