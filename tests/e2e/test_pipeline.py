"""The whole DVC pipeline, end to end, on tiny data, in a throw-away git repository built like
this one: its raw data in a folder outside the repository, its DVC remote beside it, and its
MLflow store the project's default one (no MLFLOW_TRACKING_URI)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.conftest import (
    TINY_PARAMS,
    dvc,
    make_dvc_project,
    run,
    subprocess_env,
    write_idx_dataset,
)
from tests.evaluation.test_evaluate import KEYS
from tests.evaluation.test_export import SCORE_KEYS
from vae.evaluation.score import SHIPPED_SHA256
from vae.evaluation.summary import SUMMARIES

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these

REPO = Path(__file__).resolve().parents[2]
STAGES = [
    "ingest",
    "prepare",
    "train",
    "evaluate",
    "export",
    "generate",
    "classify",
    "score",
    "register",
]
NAME = "tiny-vae"


def _env(**extra: str) -> dict[str, str]:
    env = subprocess_env(**extra)
    if "MLFLOW_TRACKING_URI" not in extra:
        env.pop("MLFLOW_TRACKING_URI", None)  # the project's own store, as for a new user
    return env


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("loop")
    source = write_idx_dataset(base / "source", n_train=200, n_test=50)
    root = make_dvc_project(base / "proj", source, mlflow={"enabled": True})
    dvc(root, "repro", env=_env(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1"))
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "tiny pipeline run")
    return root


def _client(root: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def test_pipeline_outputs(pipeline_repo: Path) -> None:
    root = pipeline_repo
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["epochs"] == TINY_PARAMS["train"]["epochs"]
    ev = json.loads((root / "metrics/eval.json").read_text())
    for key in KEYS:
        assert key in ev, key
    assert ev["iw_samples"] == TINY_PARAMS["evaluate"]["iw_samples"]
    assert ev["nll_iw"] <= -ev["elbo"] + 1e-6 and ev["elbo_gap"] >= 0
    assert len(ev["kl_per_dim"]) == TINY_PARAMS["model"]["latent_dim"]
    down = json.loads((root / "metrics/downstream.json").read_text())
    for key in SCORE_KEYS:
        assert 0.0 <= down[key] <= 1.0, key
    d = TINY_PARAMS["model"]["latent_dim"]
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    for split in ("train", "val", "test"):
        df = pd.read_parquet(root / "data/embeddings" / f"{split}.parquet")
        assert len(df) == manifest["splits"][split]["count"]
        expected = ["split", "index", "label"] + [f"mu_{i}" for i in range(d)]
        expected += [f"logvar_{i}" for i in range(d)]
        assert list(df.columns) == expected
        assert (df["split"] == split).all() and df["index"].tolist() == list(range(len(df)))
    for name in ("samples", "samples_stochastic", "reconstructions", "interpolations", "latent_2d"):
        with Image.open(root / "reports" / f"{name}.png") as im:
            assert im.size[0] > 0
    quality = json.loads((root / "metrics/quality.json").read_text())
    sets = {"real_train", "prior_mean", "prior_sample", "gmm_mean", "gmm_sample", "reconstruction"}
    sets |= {"diffusion_mean", "diffusion_sample"}
    sets |= {f"{n}_mean_t{t}" for n in ("prior", "diffusion") for t in ("0.9", "1.1", "1.2")}
    assert set(quality["sets"]) == sets and quality["sampler"] == "diffusion"
    for name, m in quality["sets"].items():
        assert m["fid"] >= 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1, name
        assert m["n"] == TINY_PARAMS["score"]["n_samples"], name
    assert 0 <= quality["feature_net_test_accuracy"] <= 1
    assert quality["feature_net_sha256"] == SHIPPED_SHA256["fashion_mnist"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)


def test_dvc_exp_show_shows_the_compared_numbers_only(pipeline_repo: Path) -> None:
    """The metric columns are the summaries' numbers, by their own names: no timing, string
    or per-set count of the full records (which stay in metrics/ for the flows)."""
    header = dvc(pipeline_repo, "exp", "show", "--csv", "--no-pager").splitlines()[0]
    columns = header.split(",")[5:]  # after Experiment, rev, typ, Created, parent
    # params are dotted (train.epochs), deps are paths; a record's leaf would be either
    metrics = {c for c in columns if "." not in c and "/" not in c}
    assert metrics == {col for spec in SUMMARIES.values() for col, _ in spec}, header
    assert not any(c.startswith("sets.") or ":" in c for c in columns), header  # no prefixes


def test_dvc_hashes_the_data_and_the_run_carries_them(pipeline_repo: Path) -> None:
    root = pipeline_repo
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    source = lock["ingest"]["deps"][0]
    assert source["path"] == str(root.parent / "source")  # outside the repository
    (raw,) = lock["ingest"]["outs"]
    assert raw["path"] == "data/raw" and raw["md5"] == source["md5"], "an exact copy"
    trained_on = next(d for d in lock["train"]["deps"] if d["path"] == "data/prepared")
    (run_,) = _client(root).search_runs(_client(root).get_experiment_by_name("tiny").experiment_id)
    tags = run_.data.tags
    assert tags["dvc.source"] == source["path"] and tags["dvc.source.md5"] == source["md5"]
    assert tags["dvc.raw.md5"] == raw["md5"]
    assert tags["dvc.prepared.md5"] == trained_on["md5"], "the data that trained the model"
    assert run_.info.artifact_uri.startswith((root / "mlruns").as_uri())
    (version,) = _client(root).search_model_versions(f"name = '{NAME}'")
    assert version.run_id == run_.info.run_id
    assert version.tags["dvc.prepared.md5"] == trained_on["md5"]
    # the resumable checkpoint is deliberately not a DVC output: nothing to push or miss
    assert "models/checkpoint.pt" not in (root / "dvc.lock").read_text()
    assert (root / "models" / "checkpoint.pt").is_file()


def test_training_logs_image_grids_at_each_epoch(pipeline_repo: Path) -> None:
    """The MLflow UI's image slider: both grids at every epoch (image_every 1), PNG and WebP."""
    client = _client(pipeline_repo)
    (run_,) = client.search_runs(client.get_experiment_by_name("tiny").experiment_id)
    names = [Path(f.path).name for f in client.list_artifacts(run_.info.run_id, "images")]
    epochs = range(TINY_PARAMS["train"]["epochs"] + 1)  # 0: the untrained model
    for key in ("samples", "reconstructions"):
        for step in epochs:
            found = [n for n in names if n.startswith(f"{key}+step+{step}+")]
            assert sorted(Path(n).suffix for n in found) == [".png", ".webp"], (key, step, names)
    assert run_.data.tags["mlflow.loggedImages"] == "True"


def test_the_run_records_its_data_model_and_machine(pipeline_repo: Path) -> None:
    """MLflow 3 lineage: the splits as dataset inputs whose digest is DVC's hash of the split's
    file, the logged model the run created with the test metrics measured on the test split,
    CPU and memory as system metrics, and a registered model that describes itself."""
    root, client = pipeline_repo, _client(pipeline_repo)
    (run_,) = client.search_runs(client.get_experiment_by_name("tiny").experiment_id)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    (prepared,) = lock["prepare"]["outs"]
    manifest_file = root / ".dvc/cache/files/md5" / prepared["md5"][:2] / prepared["md5"][2:]
    dvc_md5 = {e["relpath"]: e["md5"] for e in json.loads(manifest_file.read_text())}
    inputs = {i.dataset.name: i for i in run_.inputs.dataset_inputs}
    assert set(inputs) == {f"fashion_mnist-{s}" for s in ("train", "val", "test")}
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        entry = inputs[f"fashion_mnist-{split}"]
        assert entry.dataset.digest == dvc_md5[f"{split}.pt"], split
        assert json.loads(entry.dataset.source)["uri"] == str(root.parent / "source")
        assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == context
    run_file = json.loads((root / "models" / "mlflow_run.json").read_text())
    logged = client.get_logged_model(run_file["model_id"])
    assert logged.source_run_id == run_.info.run_id and logged.status.value == "READY"
    on_test = {m.key: m for m in logged.metrics if m.dataset_name == "fashion_mnist-test"}
    ev = json.loads((root / "metrics/eval.json").read_text())
    assert on_test["evaluate.nll_iw"].value == ev["nll_iw"]
    assert on_test["evaluate.nll_iw"].dataset_digest == dvc_md5["test.pt"]
    system = {k for k in run_.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    assert version.source == f"models:/{logged.model_id}"
    card = json.loads((root / "metrics/registry.json").read_text())["card"]
    assert card == "card/model_card_v1.html"
    assert [f.path for f in client.list_artifacts(run_.info.run_id, "card")] == [card]
    assert f"/runs/{run_.info.run_id}/artifacts/{card})" in version.description
    registered = client.get_registered_model(NAME)
    assert "@champion" in registered.description and "nll_iw" in registered.description
    example = logged.artifact_location.removeprefix("file://") + "/input_example.json"
    pixels = np.array(json.loads(Path(example).read_text()))
    assert pixels.shape == (1, 784) and pixels.std() > 0, "a real test image"


def test_exported_embeddings_are_what_vae_encode_returns(
    pipeline_repo: Path, tmp_path: Path
) -> None:
    """The data is binarized, yet a row of test.parquet is the champion's code for that image."""
    from tests.conftest import idx_bytes
    from vae.cli import main
    from vae.data.splits import load_split

    root = pipeline_repo
    images = load_split(root / "data/prepared/test.pt").images[:20]  # (20, 1, 28, 28) uint8
    (tmp_path / "t.idx3-ubyte").write_bytes(idx_bytes(images[:, 0]))
    out = tmp_path / "e.parquet"
    store = f"sqlite:///{root / 'mlflow.db'}"
    model = f"models:/{NAME}@champion"
    args = ["encode", "--model", model, "--tracking-uri", store, str(tmp_path / "t.idx3-ubyte")]
    assert main([*args, "--out", str(out)]) == 0
    d = TINY_PARAMS["model"]["latent_dim"]
    columns = [f"mu_{i}" for i in range(d)]
    exported = pd.read_parquet(root / "data/embeddings/test.parquet")[columns].to_numpy()[:20]
    encoded = pd.read_parquet(out)[columns].to_numpy()
    assert abs(encoded - exported).max() < 1e-4


def test_second_repro_changes_nothing(pipeline_repo: Path) -> None:
    out = dvc(pipeline_repo, "repro", env=_env())
    assert "up to date" in out.lower(), out
    for stage in STAGES:
        assert f"Running stage '{stage}'" not in out


def test_push_then_a_fresh_clone_pulls_everything(pipeline_repo: Path) -> None:
    root = pipeline_repo
    dvc(root, "push", env=_env())
    remote = root.parent / "vae-dvc-remote"  # the default remote: a folder beside the clone
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*"))
    clone = root.parent / "clone"
    run(root.parent, "git", "clone", "-q", str(root), str(clone))
    assert not (clone / "models" / "model.pt").exists()
    dvc(clone, "pull", env=_env())
    assert "Data and pipelines are up to date" in dvc(clone, "status", env=_env())
    assert "up to date" in dvc(clone, "repro", env=_env()).lower(), "nothing reruns"
    # With the team's store, the clone evaluates the pulled model, logging into its run.
    store = f"sqlite:///{root / 'mlflow.db'}"
    run(clone, "vae", "-q", "evaluate", env=_env(MLFLOW_TRACKING_URI=store))
    ours, theirs = (json.loads((r / "metrics/eval.json").read_text()) for r in (clone, root))
    assert (ours["nll_iw"], ours["elbo"]) == (theirs["nll_iw"], theirs["elbo"])
    assert not (clone / "models" / "checkpoint.pt").exists(), "nothing was trained"
    # With its own store, which lacks that run: one line naming both stores, nothing written.
    for stage in ("evaluate", "register"):
        before = (clone / "metrics" / "registry.json").read_text()
        proc = subprocess.run(
            ["vae", stage], cwd=clone, env=_env(), capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 1, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        run_id = json.loads((clone / "models/mlflow_run.json").read_text())["run_id"]
        assert f"MLflow run {run_id} is not in sqlite:///{clone / 'mlflow.db'}" in line
        assert f"it was logged to sqlite:///{root / 'mlflow.db'}" in line
        assert "MLFLOW_TRACKING_URI" in line
        assert (clone / "metrics" / "registry.json").read_text() == before
    assert not (clone / "mlflow.db").exists(), "no empty store created on the way"


def _wait_for_queue(root: Path, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while True:
        status = dvc(root, "queue", "status", env=_env())
        busy = any(w in status for w in ("Queued", "Running", "1 active"))
        if not busy or time.time() > deadline:
            return status
        time.sleep(2)


@pytest.fixture
def queue_workers(pipeline_repo: Path) -> Iterator[Path]:
    """Stops every queue worker the test started, whatever happens."""
    yield pipeline_repo
    subprocess.run(
        [sys.executable, "-m", "dvc", "queue", "stop", "--kill"],
        cwd=pipeline_repo,
        env=_env(),
        capture_output=True,
        timeout=120,
    )
    status = dvc(pipeline_repo, "queue", "status", env=_env())
    assert "Worker status: 0 active" in status, status


def test_experiments_land_in_the_project_store(queue_workers: Path) -> None:
    root = queue_workers
    client = _client(root)
    versions = len(client.search_model_versions(f"name = '{NAME}'"))
    dvc(root, "exp", "run", "--temp", "--name", "temp-exp", "-S", "train.epochs=1", env=_env())
    dvc(root, "exp", "run", "--queue", "--name", "queued-exp", "-S", "train.epochs=1",
        "-S", "mlflow.register_experiments=true", env=_env())  # fmt: skip
    dvc(root, "queue", "start", env=_env())
    status = _wait_for_queue(root)
    assert "Success" in status and "Failed" not in status, status
    baseline = run(root, "git", "rev-parse", "HEAD").strip()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    by_exp = {r.data.tags.get("dvc.exp_name"): r for r in runs}
    for name in ("temp-exp", "queued-exp"):  # both found from MLflow, and back
        assert by_exp[name].data.tags["dvc.exp_baseline_rev"] == baseline
        assert by_exp[name].info.artifact_uri.startswith((root / "mlruns").as_uri())
        assert by_exp[name].data.params["train.epochs"] == "1"
    shown = dvc(root, "exp", "show", "--csv", env=_env())
    assert "temp-exp" in shown and "queued-exp" in shown
    # Only the experiment that asked for it registered a version.
    new = client.search_model_versions(f"name = '{NAME}'")
    assert len(new) == versions + 1
    (registered,) = [v for v in new if v.run_id == by_exp["queued-exp"].info.run_id]
    assert registered.tags["dvc.exp_name"] == "queued-exp"
    ref = run(root, "git", "for-each-ref", "--format=%(refname)", "refs/exps/").split()
    (temp_ref,) = [r for r in ref if r.endswith("/temp-exp")]
    decision = json.loads(run(root, "git", "show", f"{temp_ref}:metrics/registry.json"))
    assert decision["registered"] is False and decision["model_uri"].startswith("models:/")
    assert "register_experiments" in decision["reason"]
    assert not list((root / ".dvc" / "tmp" / "exps").glob("tmp*")), "the copies are gone"


def test_new_raw_data_reruns_the_pipeline(pipeline_repo: Path) -> None:
    root = pipeline_repo
    source = root.parent / "source"
    write_idx_dataset(source, n_train=240, n_test=50)  # the source changed (a new Debian copy)
    status = dvc(root, "status", env=_env())
    assert "ingest" in status and "modified" in status and str(source) in status, status
    out = dvc(root, "repro", env=_env())
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, stage
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 240
    assert "Data and pipelines are up to date" in dvc(root, "status", env=_env())
