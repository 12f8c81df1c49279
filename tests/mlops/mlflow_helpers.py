"""Shared by the MLflow tests: a tiny project with MLflow on, its pipeline run stage by stage
through ``vae.cli.main``, and the check of the MLflow run and registry one pipeline run leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_PARAMS, project_env, write_idx_dataset
from vae.cli import main
from vae.mlops.pipeline_run import flatten_metrics

NAME = "tiny-vae"
STAGES = ["prepare", "train", "evaluate", "export", "generate", "classify", "score", "register"]


def make_project(root: Path, **mlflow: object) -> Path:
    params = {k: dict(v) for k, v in TINY_PARAMS.items()}
    params["mlflow"].update({"enabled": True, **mlflow})
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_idx_dataset(root / "data" / "raw")
    return root


def run_pipeline(root: Path, uri: str, stages: list[str] = STAGES) -> None:
    with project_env(root, uri):
        for stage in stages:
            assert main(["-q", stage]) == 0, stage


def _client(uri: str):
    from vae.mlops import store

    return store.client(uri)


def _check_run_and_registry(root: Path, uri: str) -> None:
    client = _client(uri)
    run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    assert run.info.status == "FINISHED"
    # every param, flattened from params.yaml
    from vae.params import load_params

    with project_env(root, uri):
        flat = load_params().flat()
    assert run.data.params == {k: str(v) for k, v in flat.items()}
    for tag in ("git_commit", "dataset_sha256", "device", "torch_version", "vae_version"):
        assert run.data.tags.get(tag), tag
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert run.data.tags["dataset_sha256"] == manifest["dataset_sha256"]
    # per-epoch metrics with their step
    history = client.get_metric_history(run_id, "val_nelbo")
    assert sorted(m.step for m in history) == [1, 2]
    # the JSON metrics files and MLflow agree exactly
    pairs = (
        ("train", "train"),
        ("evaluate", "eval"),
        ("export", "downstream"),
        ("score", "quality"),
    )
    for stage, name in pairs:
        expected = flatten_metrics(
            json.loads((root / f"metrics/{name}.json").read_text()), f"{stage}."
        )
        assert expected, stage
        for key, value in expected.items():
            assert run.data.metrics[key] == pytest.approx(value, rel=1e-12), key
    artifacts = {
        a.path
        for d in ("train", "evaluate", "generate", "score", "register")
        for a in client.list_artifacts(run_id, d)
    }
    for path in (
        "train/train.csv",
        "evaluate/eval.json",
        "generate/samples.png",
        "generate/latent_2d.png",
        "generate/sampler.safetensors",
        "score/quality.json",
        "register/registry.json",
    ):
        assert path in artifacts, path
    # the registered version, its tags and aliases
    decision = json.loads((root / "metrics/registry.json").read_text())
    assert decision["promoted"] is True and decision["version"] == 1
    version = client.get_model_version_by_alias(NAME, "champion")
    assert str(version.version) == "1" and version.run_id == run_id
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "1"
    assert version.tags["dataset_sha256"] == manifest["dataset_sha256"]
    ev = json.loads((root / "metrics/eval.json").read_text())
    assert float(version.tags["nll_iw"]) == pytest.approx(ev["nll_iw"])
    # it describes itself in the registry UI: input format, usage, source run
    assert "float32 array (N, 784) = (N, 1·28·28)" in version.description
    assert f'load_model("models:/{NAME}/1")' in version.description
    assert run_id in version.description and version.tags["source_run"] == run_id
    usage = version.tags["usage"]
    assert len(usage.splitlines()) == 3 and usage in version.description
