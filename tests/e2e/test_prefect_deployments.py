"""One definition of the stage graph, the schedule and the deployments: dvc.yaml's stage
order, the cron in params.yaml, ``pipelines.serve``'s deployments and prefect.yaml agree.

Prefect reads its settings when it is first imported, so this module imports it (and
``pipelines``) only inside tests, after the autouse ``prefect_env`` has pointed PREFECT_HOME at
a tmp folder and turned analytics off. No Prefect server is started here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, dvc, tiny_params

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these


@pytest.fixture(scope="module", autouse=True)
def _prefect_env(prefect_env: None) -> None:
    """Every test here runs with ``prefect_env`` (conftest.py) set, as if it asked for it."""


def test_flow_stages_are_dvc_yaml_in_topological_order(tmp_path: Path) -> None:
    from pipelines.flows import stage_order

    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert stage_order(REPO) == stages  # dvc.yaml lists them in a valid order already
    # A stage listed before the one it depends on still runs after it.
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "b": {"cmd": "cp a.txt b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
                    "c": {"cmd": "echo c > c.txt", "outs": ["c.txt"]},
                    "a": {"cmd": "echo a > a.txt", "outs": ["a.txt"]},
                }
            },
            sort_keys=False,
        )
    )
    dvc(tmp_path, "init", "-q", "--no-scm")
    assert stage_order(tmp_path) == ["c", "a", "b"]


def test_bad_schedule_names_the_key() -> None:
    from vae.config import ConfigError
    from vae.params import parse_params

    with pytest.raises(ConfigError, match=r"^schedule\.cron: '0 3 \* \*' is not a cron"):
        parse_params({"schedule": {"cron": "0 3 * *"}})
    with pytest.raises(ConfigError, match=r"^schedule\.timezone: 'Mars/Olympus'"):
        parse_params({"schedule": {"timezone": "Mars/Olympus"}})


def test_deployment_carries_the_cron_schedule_from_params(tmp_path: Path) -> None:
    from pipelines.serve import build_deployments

    params = tiny_params(schedule={"cron": "15 4 * * 2", "timezone": "Europe/Berlin"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    pipeline, retrain = build_deployments(tmp_path)
    assert (pipeline.flow_name, retrain.flow_name) == ("vae-pipeline", "vae-retrain")
    assert pipeline.schedules == []
    (schedule,) = retrain.schedules
    assert schedule.schedule.cron == "15 4 * * 2"
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert schedule.active
    assert retrain.parameters == {"root": str(tmp_path.resolve()), "force": False}


def test_prefect_yaml_deploys_the_same_flows_and_schedule() -> None:
    from prefect.flows import load_flow_from_entrypoint

    from vae.params import load_params

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["entrypoint"]: d for d in config["deployments"]}
    names = {}
    old = Path.cwd()
    os.chdir(REPO)  # entrypoints are relative to the project
    try:
        for entrypoint in deployments:
            names[entrypoint] = load_flow_from_entrypoint(entrypoint).name
    finally:
        os.chdir(old)
    assert sorted(names.values()) == ["vae-pipeline", "vae-retrain"]
    (retrain,) = [d for e, d in deployments.items() if names[e] == "vae-retrain"]
    (schedule,) = retrain["schedules"]
    params = load_params(REPO / "params.yaml").schedule
    assert (schedule["cron"], schedule["timezone"]) == (params.cron, params.timezone)
    assert {d["work_pool"]["name"] for d in config["deployments"]} == {"vae-process"}
