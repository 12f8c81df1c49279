"""MLflow: one run per pipeline run, the registry and its promotion gate, and real consumers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import (
    TINY_PARAMS,
    free_port,
    models_serve_args,
    post_json,
    project_env,
    serving,
    start_server,
    stop_server,
    tiny_vae,
    tracking_server_args,
    write_idx_dataset,
)
from vae.cli import main
from vae.mlops.mlflow_tracker import flatten_metrics
from vae.mlops.registry import decide_promotion

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these

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


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = make_project(tmp_path_factory.mktemp("mlflow_local"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_pipeline(root, uri)
    return root, uri


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


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


def test_local_run_metrics_artifacts_and_registry(local: tuple[Path, str]) -> None:
    _check_run_and_registry(*local)


def test_pyfunc_matches_eager_model(local: tuple[Path, str]) -> None:
    import mlflow

    from vae.core.sampler import SAMPLER_FILE, load_sampler
    from vae.mlops.registry import load_vae
    from vae.training.checkpoint import load_model

    root, uri = local
    with project_env(root, uri):
        mlflow.set_tracking_uri(uri)
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        eager, _ = load_model("models/model.pt")
        torch_model = load_vae(f"models:/{NAME}@champion")
    images = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    flat = images.reshape(5, 784)  # the signature's input: (N, C*H*W) float32
    with torch.no_grad():
        q = eager.encode(torch.from_numpy(images))
        mu, logvar = q.mean.numpy(), q.logvar.numpy()
        recon = eager.decode(q.mean).mean.flatten(1).numpy()
    np.testing.assert_allclose(pyfunc.predict(flat), mu, rtol=1e-5, atol=1e-6)
    both = pyfunc.predict(flat, params={"logvar": True})
    np.testing.assert_allclose(both, np.concatenate([mu, logvar], 1), rtol=1e-5, atol=1e-6)
    out = pyfunc.predict(flat, params={"mode": "reconstruct"})
    np.testing.assert_allclose(out, recon, rtol=1e-5, atol=1e-6)
    # raw pixels, as JSON delivers them: 0..255 in a float32 array, with the uint8 switch
    pixels = np.random.default_rng(1).integers(0, 256, (5, 784)).astype(np.float32)
    np.testing.assert_array_equal(
        pyfunc.predict(pixels, params={"uint8": True}), pyfunc.predict(pixels / 255.0)
    )
    # MLflow checks the schema before predict; predict's own check still takes (N, C, H, W)
    from mlflow.exceptions import MlflowException

    from vae.pyfunc import VAEPyfunc

    with pytest.raises(MlflowException, match=r"expected shape \(-1, 784\)"):
        pyfunc.predict(images)
    np.testing.assert_allclose(VAEPyfunc(torch_model).predict(images), mu, rtol=1e-5, atol=1e-6)
    gen = pyfunc.predict(flat[:1], params={"mode": "generate", "n": 7, "seed": 3})
    assert gen.shape == (7, 784)
    # generate draws z from the mixture `vae generate` fitted (generate.sampler: gmm)
    kind, eager.latent_sampler = load_sampler(root / "models" / SAMPLER_FILE)
    assert kind == "gmm" and torch_model.latent_sampler is not None
    expected = eager.generate(7, torch.Generator().manual_seed(3)).flatten(1).numpy()
    np.testing.assert_allclose(gen, expected, rtol=1e-5, atol=1e-6)
    again = pyfunc.predict(flat[:1], params={"mode": "generate", "n": 7, "seed": 3})
    np.testing.assert_array_equal(gen, again)
    for name, tensor in eager.state_dict().items():
        assert torch.equal(torch_model.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((2, 10), dtype=np.float32), "does not match expected shape"),
        (np.array([["a"] * 784]), "does not match expected dtype"),
        (np.zeros((2, 784)), "dtype of input float64 does not match expected dtype float32"),
        (np.full((1, 784), np.nan, dtype=np.float32), "NaN"),
        (np.full((1, 784), 2.0, dtype=np.float32), r"\[0, 1\], got \[2, 2\]; for 0..255"),
    ],
)
def test_pyfunc_rejects_bad_input(local: tuple[Path, str], bad: np.ndarray, message: str) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    _, uri = local
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    with pytest.raises(MlflowException, match=message):
        pyfunc.predict(bad)


def test_fresh_process_consumer(local: tuple[Path, str], tmp_path: Path) -> None:
    """Another folder, a fresh process: the model runs the code it ships, not the project's."""
    _, uri = local
    code = (
        "import mlflow, numpy as np, sys;"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion');"
        "print(m.predict(np.random.rand(5, 784).astype(np.float32)).shape);"
        "print(sys.modules['vae.core.model'].__file__);"
        "print(sorted(k for k in sys.modules if k.startswith('vae')))"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    shape, model_file, modules = out.stdout.strip().splitlines()
    assert shape == f"(5, {TINY_PARAMS['model']['latent_dim']})"
    assert model_file.endswith("/code/vae/core/model.py"), model_file
    assert modules == str(
        [
            "vae",
            "vae.config",
            "vae.core.distributions",
            "vae.core.hierarchy",
            "vae.core.layers",
            "vae.core.model",
            "vae.pyfunc",
            "vae.core.resnet",
            "vae.core.sampler",
        ]
    )


def test_promotion_gate() -> None:
    assert decide_promotion(10.0, None, None)[0] is True
    assert decide_promotion(9.0, 10.0, "1") == (True, "nll_iw 9.000 < champion v1's 10.000 nats")
    promoted, why = decide_promotion(11.0, 10.0, "1")
    assert not promoted and "champion stays" in why
    assert decide_promotion(None, 10.0, "1")[0] is False
    assert decide_promotion(float("nan"), None, None)[0] is False


def test_worse_challenger_leaves_champion(local: tuple[Path, str]) -> None:
    from vae.mlops.registry import register
    from vae.training.checkpoint import load_model

    root, uri = local
    client = _client(uri)
    run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    champion = client.get_model_version_by_alias(NAME, "champion")
    key = {
        k: champion.tags[k] for k in ("dataset_sha256", "binarize", "iw_samples", "evaluate_seed")
    }
    with project_env(root, uri):
        model, _ = load_model("models/model.pt")
        worse = register(model, NAME, run_id, {"nll_iw": 1e9}, key, lambda m: 0.0)
        missing = register(model, NAME, run_id, None, key, lambda m: 0.0)
    assert worse["promoted"] is False and "champion stays" in worse["reason"]
    assert missing["promoted"] is False and "evaluation missing" in missing["reason"]
    assert client.get_model_version_by_alias(NAME, "champion").version == champion.version
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == str(
        missing["version"]
    )


def test_models_serve_answers_invocations(local: tuple[Path, str]) -> None:
    root, uri = local
    port = free_port()
    # the operator's row limit for the served model
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "VAE_MAX_ROWS": "50"}
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    args = models_serve_args(mlflow_bin, f"models:/{NAME}@champion", port)
    latent = TINY_PARAMS["model"]["latent_dim"]
    with serving(args, f"http://127.0.0.1:{port}/ping", root, env):
        rng = np.random.default_rng(1)
        images = rng.random((3, 784)).round(4).tolist()
        url = f"http://127.0.0.1:{port}/invocations"
        status, body = post_json(url, {"inputs": images})
        assert status == 200, body
        z = np.asarray(body["predictions"])
        assert z.shape == (3, latent)
        # the same answer from each payload format MLflow takes
        split = {"columns": list(range(784)), "data": images}
        for payload in ({"instances": images}, {"dataframe_split": split}):
            status, body = post_json(url, payload)
            assert status == 200, (list(payload), body)
            np.testing.assert_allclose(body["predictions"], z, rtol=1e-5, atol=1e-6)
        status, body = post_json(url, {"inputs": images, "params": {"mode": "reconstruct"}})
        assert status == 200 and np.asarray(body["predictions"]).shape == (3, 784), body
        # raw 0..255 pixels (JSON integers) with the documented switch
        pixels = rng.integers(0, 256, (3, 784))
        status, body = post_json(url, {"inputs": pixels.tolist(), "params": {"uint8": True}})
        assert status == 200, body
        status, scaled = post_json(url, {"inputs": (pixels / 255.0).tolist()})
        np.testing.assert_allclose(body["predictions"], scaled["predictions"], rtol=1e-5, atol=1e-6)
        for payload, message in (
            ({"inputs": pixels.tolist()}, 'for 0..255 pixels pass params {"uint8": true}'),
            ({"inputs": [[2.0] * 784]}, "[0, 1]"),
            ({"inputs": [[0.5] * 10]}, "does not match expected shape (-1, 784)"),
            ({"inputs": [[0.5] * 784] * 51}, "51 rows, more than this model's max_rows of 50"),
            ({"inputs": images, "params": {"mode": "bogus"}}, "params.mode"),
            ({"inputs": images, "params": {"mode": "generate", "n": 51}}, "max_rows of 50"),
        ):
            status, body = post_json(url, payload)
            assert status == 400 and message in body.get("message", ""), (message, body)

        # A bounded burst: 200 requests from 8 threads, all answered, all equal to predict().
        from concurrent.futures import ThreadPoolExecutor

        import mlflow

        mlflow.set_tracking_uri(uri)
        direct = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        rng = np.random.default_rng(2)
        batches = [rng.random((2, 784)).astype(np.float32) for _ in range(200)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda b: post_json(url, {"inputs": b.tolist()}), batches))
        for batch, (status, body) in zip(batches, answers, strict=True):
            assert status == 200, body
            np.testing.assert_allclose(
                body["predictions"], direct.predict(batch), rtol=1e-5, atol=1e-6
            )


def test_real_tracking_server(tmp_path: Path) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server_dir = tmp_path / "server"
    root = make_project(tmp_path / "proj")
    with serving(
        tracking_server_args(port, server_dir), f"{uri}/health", server_dir, dict(os.environ)
    ):
        run_pipeline(root, uri)
        _check_run_and_registry(root, uri)
    assert not (root / "mlruns").exists() and not (root / "mlflow.db").exists()


def test_server_gone_mid_run_then_relog(tmp_path: Path) -> None:
    """Training outlives the tracking server, says so, and `vae log-run` re-logs later."""
    from tests.conftest import write_params

    server_dir = tmp_path / "server"
    root = make_project(tmp_path / "proj")
    write_idx_dataset(root / "data" / "raw", n_train=1500, n_test=50)
    write_params(
        root / "params.yaml",
        train={"epochs": 10, "batch_size": 8},
        mlflow={"enabled": True, "experiment": "tiny", "registered_model": NAME},
    )
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    vae = [sys.executable, "-m", "vae", "-q"]
    assert subprocess.run([*vae, "prepare"], cwd=root, env=env).returncode == 0
    server = start_server(
        tracking_server_args(port, server_dir), f"{uri}/health", server_dir, dict(os.environ)
    )
    proc = subprocess.Popen([*vae, "train"], cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    try:
        ckpt = root / "models" / "checkpoint.pt"
        deadline = time.time() + 120
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        stop_server(server)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "vae log-run" in err and "local outputs are complete" in err
    assert json.loads((root / "metrics/train.json").read_text())["epochs"] == 10
    assert torch.load(root / "models/model.pt", weights_only=True)["epoch"] >= 1

    port = free_port()  # the server is back (same store, new port): re-log
    uri = f"http://127.0.0.1:{port}"
    with serving(
        tracking_server_args(port, server_dir), f"{uri}/health", server_dir, dict(os.environ)
    ):
        out = subprocess.run(
            [*vae, "log-run"],
            cwd=root,
            capture_output=True,
            text=True,
            env={**env, "MLFLOW_TRACKING_URI": uri},
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
        client = _client(uri)
        history = client.get_metric_history(run_id, "val_nelbo")
        assert sorted({m.step for m in history}) == list(range(1, 11))
        assert client.get_run(run_id).info.status == "FINISHED"


def test_unreachable_server_fails_fast(project: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.conftest import write_params

    write_params(project / "params.yaml", mlflow={"enabled": True})
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["-q", "prepare"]) == 0
    with project_env(project, uri):
        start = time.time()
        assert main(["-q", "train"]) == 75  # EX_TEMPFAIL: a later retry may work
        assert time.time() - start < 15
    err = capsys.readouterr().err
    assert uri in err and "unreachable" in err
    assert not (project / "models" / "checkpoint.pt").exists()


def test_unknown_model_or_alias_is_a_clear_error(local: tuple[Path, str]) -> None:
    from vae.mlops.registry import RegistryError, load_vae

    root, uri = local
    with project_env(root, uri):
        with pytest.raises(RegistryError, match="models:/no-such-model@champion"):
            load_vae("models:/no-such-model@champion")
        with pytest.raises(RegistryError, match=f"models:/{NAME}@nope"):
            load_vae(f"models:/{NAME}@nope")


def test_registered_model_holds_no_pickle(local: tuple[Path, str]) -> None:
    import mlflow

    root, uri = local
    with project_env(root, uri):
        mlflow.set_tracking_uri(uri)
        path = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion"))
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert "data/vae/weights.safetensors" in files and "data/vae/vae.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))], files
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "vae.pyfunc"


def test_credentials_never_reach_logs_or_tags() -> None:
    from vae.mlops.mlflow_tracker import redact

    assert redact("https://alice:s3cret@mlflow.example.com") == (
        "https://alice:***@mlflow.example.com"
    )
    assert redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    text = json.dumps(params).lower()
    assert not any(word in text for word in ("password", "token", "secret"))


def test_reregister_makes_an_old_version_self_contained(tmp_path: Path) -> None:
    """A version logged the old way (no code/) is logged again with its code; aliases follow."""
    import mlflow

    from vae.pyfunc import save_vae_dir

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = _client(uri)
    model = tiny_vae(3, 8)
    run_id = client.create_run(client.create_experiment("old")).info.run_id
    mlflow.set_tracking_uri(uri)
    save_vae_dir(model, tmp_path / "vae")
    with mlflow.start_run(run_id=run_id):  # the format before models shipped their code
        info = mlflow.pyfunc.log_model(
            name="model", loader_module="vae.pyfunc", data_path=str(tmp_path / "vae")
        )
    mlflow.register_model(info.model_uri, "old-vae")
    client.set_model_version_tag("old-vae", "1", "nll_iw", "123.5")
    client.set_registered_model_alias("old-vae", "champion", "1")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "vae", "reregister", "--model", "models:/old-vae@champion"]
    out = subprocess.run(
        [*cmd, "--tracking-uri", uri], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["from_version"] == 1 and result["version"] == 2
    new = client.get_model_version_by_alias("old-vae", "champion")
    assert str(new.version) == "2" and new.run_id == run_id
    assert new.tags["reregistered_from"] == "1" and new.tags["nll_iw"] == "123.5"
    assert "Test nll_iw: 123.50 nats" in new.description
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/old-vae/2"))
    from vae.mlops.packaging import INFERENCE_MODULES

    shipped = sorted(p.name for p in (local / "code" / "vae").iterdir())
    assert shipped == sorted(INFERENCE_MODULES)
    loaded = mlflow.pyfunc.load_model("models:/old-vae@champion")
    x = np.random.default_rng(0).random((4, 784), dtype=np.float32)
    with torch.no_grad():
        expected = model.encode(torch.from_numpy(x).reshape(4, 1, 28, 28)).mean.numpy()
    np.testing.assert_allclose(loaded.predict(x), expected, rtol=1e-5, atol=1e-6)
    # an unknown version is one line, exit 1
    out = subprocess.run(
        [sys.executable, "-m", "vae", "reregister", "--model", "models:/old-vae/9"],
        cwd=elsewhere,
        env={**env, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "models:/old-vae/9" in out.stderr
