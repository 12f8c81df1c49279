"""``python -m pipelines.serve``: serve the flows from this process, retraining on a schedule.

``vae-retrain`` is scheduled with ``schedule.cron`` in ``schedule.timezone`` from
``params.yaml``; ``vae-pipeline`` has no schedule and runs when triggered (UI, ``prefect
deployment run 'vae-pipeline/on-demand'``). The process runs one flow run at a time: both flows
work in this one DVC workspace. Without ``PREFECT_API_URL`` it starts a local Prefect server of its
own (with the scheduler), and it exits within seconds of SIGTERM, leaving no flow run Running
(:mod:`pipelines.runner`). For a work pool instead of this process, see ``prefect.yaml``
(``prefect deploy --all``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vae.config import ConfigError, ScheduleConfig
from vae.params import load_params

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

__all__ = ["PIPELINE_DEPLOYMENT", "RETRAIN_DEPLOYMENT", "build_deployments", "main"]

PIPELINE_DEPLOYMENT = "on-demand"
RETRAIN_DEPLOYMENT = "scheduled"


def build_retrain_deployment(root: Path, schedule: ScheduleConfig) -> RunnerDeployment:
    """``vae-retrain`` on the params' cron schedule, without serving it."""
    from prefect.schedules import Cron

    from pipelines.flows import vae_retrain

    return vae_retrain.to_deployment(
        name=RETRAIN_DEPLOYMENT,
        schedules=[Cron(schedule.cron, timezone=schedule.timezone)],
        parameters={"root": str(root), "force": False},
        description="Retrain when the data changed; the registry's gate moves `champion`.",
        tags=["vae"],
    )


def build_deployments(root: str | Path = ".") -> list[RunnerDeployment]:
    """The two deployments ``main`` serves: the pipeline on demand, retraining on the cron."""
    from pipelines.flows import vae_pipeline

    root = Path(root).resolve()
    cfg = load_params(root / "params.yaml")
    pipeline = vae_pipeline.to_deployment(
        name=PIPELINE_DEPLOYMENT,
        parameters={"root": str(root)},
        description="The DVC pipeline of dvc.yaml, one task per stage.",
        tags=["vae"],
    )
    return [pipeline, build_retrain_deployment(root, cfg.schedule)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.serve", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--root", default=".", help="the project (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        deployments = build_deployments(args.root)
    except ConfigError as exc:
        print(f"pipelines.serve: error: {exc}", file=sys.stderr)
        return 2
    from pipelines.runner import serve_with_deadline

    # `prefect.serve` for two flows at once; limit=1: one flow run at a time in this workspace.
    serve_with_deadline(*deployments, limit=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
