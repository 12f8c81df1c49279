"""Retraining on a growing folder of images, end to end on tiny data against one temporary
Prefect server: the first run promotes, the same data skips, new data retrains and the gate
decides, corrupt data fails naming the file, and an epochs override runs as a DVC experiment.

Prefect reads its settings when it is first imported, so this module imports it (and
``pipelines``) only inside fixtures and tests, after the autouse ``prefect_env`` has pointed
PREFECT_HOME at a tmp folder and turned analytics off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from tests.conftest import dvc, make_dvc_project, run, write_idx_dataset
from tests.e2e.prefect_helpers import _artifacts, _failure, _report, _task_runs

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these

NAME = "tiny-vae"
MLFLOW = {
    "enabled": True,
    "experiment": "tiny",
    "registered_model": NAME,
    "register_experiments": False,
}


@pytest.fixture(scope="module", autouse=True)
def _prefect_env(prefect_env: None) -> None:
    """Every test here runs with ``prefect_env`` (conftest.py) set, as if it asked for it."""


def _png(path: Path, seed: int, size: int = 28) -> None:
    """A grey image of class ``path.parent.name``: a bright bar whose row depends on the class."""
    import numpy as np

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (size, size), dtype=np.uint8)
    row = 4 + 6 * (sum(map(ord, path.parent.name)) % 3)
    img[row : row + 3, 4:24] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _add_images(folder: Path, start: int, n: int) -> None:
    for i in range(start, start + n):
        _png(folder / ("shirts", "shoes", "bags")[i % 3] / f"{i:04d}.png", seed=i)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC project whose data.source is a folder of images outside it, which grows."""
    base = tmp_path_factory.mktemp("prefect_proj")
    _add_images(base / "images", 0, 240)
    data = {"dataset": "folder", "val_fraction": 0.2}
    return make_dvc_project(base / "proj", base / "images", data=data, mlflow=MLFLOW)


def _client(root: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def _registry(root: Path) -> tuple[list[int], int | None]:
    """The registered versions and the champion's version."""
    client = _client(root)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{NAME}'"))
    try:
        champion = int(client.get_model_version_by_alias(NAME, "champion").version)
    except Exception:  # noqa: BLE001 - no champion yet
        champion = None
    return versions, champion


# --- retraining on a growing folder ----------------------------------------------------------


def test_retrain_first_run_promotes(prefect_server: None, repo: Path) -> None:
    from prefect.client.orchestration import get_client

    from pipelines.flows import stage_order, vae_retrain
    from pipelines.locking import workspace_lock_name

    state = vae_retrain(root=str(repo), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    stages = stage_order(repo)
    assert result["status"] == "promoted" and result["champion_version"] == 1
    assert result["stages"] == dict.fromkeys(stages, True)  # every stage ran
    runs = _task_runs(state, len(stages) + 4)
    expected = ["check-data", *stages[:2], "read-versions", *stages[2:], "read-versions"]
    assert [r.name for r in runs] == [*expected, "read-run"]
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]
    report = _report(state)
    assert "challenger promoted" in report and "there was no champion yet" in report
    nll = json.loads((repo / "metrics/eval.json").read_text())["nll_iw"]
    assert f"| nll_iw | - | {nll:.3f} |" in report
    run_id = result["run_id"]
    assert f"MLflow run: [{run_id}](http://127.0.0.1:5000/#/experiments/" in report
    samples = f"{(repo / 'mlruns').as_uri()}/tiny/{run_id}/artifacts/generate/samples.png"
    assert f"Sample grid: [generate/samples.png]({samples})" in report
    assert Path(samples.removeprefix("file://")).is_file()
    artifacts = _artifacts(state.state_details.flow_run_id)
    table = json.loads(artifacts["vae-retrain-metrics"].data)
    assert artifacts["vae-retrain-metrics"].type == "table"
    assert {"metric": "nll_iw", "champion": "-", "challenger v1": f"{nll:.3f}"} in table
    assert "vae-retrain-samples" not in artifacts, "a local store: no URL to show an image by"
    link = str(artifacts["vae-retrain-run"].data)
    assert link.startswith(f"[MLflow run {run_id}](http://127.0.0.1:5000/#/experiments/"), link
    champion = _client(repo).get_model_version_by_alias(NAME, "champion")
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert str(champion.version) == "1"
    assert champion.tags["dataset_sha256"] == manifest["dataset_sha256"]
    with get_client(sync_client=True) as client:  # the workspace lock was taken and released
        limit = client.read_global_concurrency_limit_by_name(workspace_lock_name(repo))
        assert (limit.limit, limit.active, limit.active_slots) == (1, True, 0)


def test_forced_retrain_with_nothing_changed_registers_nothing(
    prefect_server: None, repo: Path
) -> None:
    from pipelines.flows import vae_retrain

    result = vae_retrain(force=True, root=str(repo))
    assert result["status"] == "unchanged" and result["champion_version"] == 1
    assert not any(result["stages"].values())
    assert _registry(repo) == ([1], 1)


def test_pipeline_flow_one_task_per_stage(prefect_server: None, repo: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from pipelines.flows import stage_order, vae_pipeline

    # The stages ran in the retraining flow: here each task finds its stage up to date.
    state = vae_pipeline(root=str(repo), return_state=True)
    assert state.is_completed(), state
    stages = stage_order(repo)
    assert state.result() == dict.fromkeys(stages, False)
    runs = _task_runs(state, len(stages))
    assert [r.name for r in runs] == stages
    assert all(r.state.is_completed() for r in runs)
    APILogWorker.drain_all(timeout=10)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    text = "\n".join(log.message for log in logs)
    for stage in stages:  # DVC's own output, in each stage's task log
        assert f"Stage '{stage}' didn't change, skipping" in text, text


def test_retrain_follows_a_growing_folder(prefect_server: None, repo: Path) -> None:
    """Same data: skip. New images: retrain and let the gate decide. Corrupt new images: fail
    with one line naming the file, leaving the prepared data, models and registry alone."""
    from pipelines.flows import vae_retrain

    images = repo.parent / "images"
    skipped = vae_retrain(root=str(repo))
    assert skipped["status"] == "skipped" and "unchanged since champion v1" in skipped["reason"]
    assert skipped["stages"] == {"ingest": False, "prepare": False}

    _add_images(images, 240, 120)  # new data arrives
    state = vae_retrain(root=str(repo), return_state=True)
    grown = state.result()
    assert grown["status"] in ("promoted", "kept") and grown["challenger_version"] == 2
    assert all(grown["stages"].values()), grown["stages"]
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert sum(s["count"] for s in manifest["splits"].values()) == 360
    versions, champion = _registry(repo)
    assert versions == [1, 2] and champion == grown["champion_version"]
    assert f"champion v{champion}" in grown["reason"] or champion == 2
    assert vae_retrain(root=str(repo))["status"] == "skipped"

    before = (repo / "data/prepared/manifest.json").read_bytes(), _registry(repo)
    model = (repo / "models/model.pt").read_bytes()
    truncated = images / "shoes" / "9000.png"
    _png(truncated, seed=9000)
    truncated.write_bytes(truncated.read_bytes()[:200])
    wrong_size = images / "bags" / "9001.png"
    for bad, expected in ((truncated, "cannot read the image"), (wrong_size, "(1, 32, 32)")):
        if bad == wrong_size:
            truncated.unlink()
            _png(wrong_size, seed=9001, size=32)
        state = vae_retrain(root=str(repo), return_state=True)
        assert state.is_failed()
        message = str(state.result(raise_on_failure=False))
        assert "\n" not in message and str(bad) in message and expected in message, message
        assert message.startswith("check-data: vae ingest: error: ")
        assert "did not complete:** check-data (Failed)" in _failure(state)
        runs = _task_runs(state, 1)
        assert [r.name for r in runs] == ["check-data"], "nothing ran after the check"
        after = (repo / "data/prepared/manifest.json").read_bytes(), _registry(repo)
        assert after == before and (repo / "models/model.pt").read_bytes() == model
    wrong_size.unlink()
    assert "Data and pipelines are up to date" in dvc(repo, "status")


def test_a_bad_idx_file_fails_the_run_naming_it(prefect_server: None, tmp_path: Path) -> None:
    from pipelines.flows import vae_retrain

    source = write_idx_dataset(tmp_path / "idx", n_train=50, n_test=20)
    bad = source / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:30])
    root = make_dvc_project(tmp_path / "proj", source, mlflow=MLFLOW)
    state = vae_retrain(root=str(root), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert message.startswith(f"check-data: vae ingest: error: {bad}: "), message
    assert not (root / "data" / "raw").exists() and not (root / "mlflow.db").exists()


def test_retrain_rejects_a_bad_epochs_override_before_any_work(
    prefect_server: None, repo: Path
) -> None:
    from pipelines.flows import vae_retrain
    from vae.config import ConfigError

    before = (repo / "params.yaml").read_text()
    state = vae_retrain(epochs=0, root=str(repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match=r"^train\.epochs: 0 is out of range"):
        state.result()
    assert (repo / "params.yaml").read_text() == before


def test_epochs_override_runs_as_an_experiment_and_leaves_no_edit(
    prefect_server: None, repo: Path
) -> None:
    from pipelines.flows import vae_retrain

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = 1e-7  # a challenger that barely moves from its random init
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, "git", "commit", "-qam", "a worse lr")
    before = {p: (repo / p).read_bytes() for p in ("params.yaml", "metrics/train.json")}
    versions, champion = _registry(repo)
    state = vae_retrain(force=True, epochs=1, root=str(repo), return_state=True)
    result = state.result()
    assert result["status"] == "kept", result
    assert result["champion_version"] == champion
    assert result["challenger_version"] == versions[-1] + 1
    assert "champion stays" in result["reason"]
    assert {p: (repo / p).read_bytes() for p in before} == before, "the checkout is untouched"
    exp = result["experiment"]
    assert exp and exp in dvc(repo, "exp", "show", "--csv")
    (exp_run,) = _client(repo).search_runs(
        [_client(repo).get_experiment_by_name("tiny").experiment_id],
        filter_string=f"tags.`dvc.exp_name` = '{exp}'",
    )
    assert exp_run.info.run_id == result["run_id"]
    assert exp_run.data.params["train.epochs"] == "1"
    runs = _task_runs(state, 6)
    assert [r.name for r in runs][-4:] == [
        "read-versions",
        "experiment",
        "read-versions",
        "read-run",
    ]
    report = _report(state)
    assert "champion kept" in report and f"DVC experiment: `{exp}`" in report
