"""One local pipeline run with MLflow on (a SQLite store, run once per module): its run and
registered version, the promotion gate, and the registered model as consumers use it: the pyfunc
in this process and a fresh one, ``load_vae``, and ``mlflow models serve``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
)
from tests.mlops.mlflow_helpers import (
    NAME,
    _check_run_and_registry,
    _client,
    make_project,
    run_pipeline,
)
from vae.cli import main
from vae.imports import closure
from vae.mlops.registry import decide_promotion

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = make_project(tmp_path_factory.mktemp("mlflow_local"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_pipeline(root, uri)
    return root, uri


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
    # generate draws z from the density `vae generate` fitted (generate.sampler: diffusion)
    kind, fitted = load_sampler(root / "models" / SAMPLER_FILE)
    eager.latent_sampler = fitted[kind]
    assert kind == "diffusion" and torch_model.latent_sampler is not None
    assert torch_model.latent_sampler.kind == "diffusion"
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
    # exactly what the walker says vae.pyfunc imports: nothing of the project's own tree
    assert modules == str(sorted(closure(["vae.pyfunc"])))


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


def _record(client: object, run_id: str) -> tuple[set[str], set[str]]:
    """(metric names, artifact paths) of one run, less what only the live run can log: the
    per-epoch image grids and the system metrics (no local file holds them)."""
    run = client.get_run(run_id)
    paths, todo = set(), [None]
    while todo:
        for info in client.list_artifacts(run_id, todo.pop()):
            (todo.append(info.path) if info.is_dir else paths.add(info.path))
    live = {"epoch_images_seconds"}
    metrics = {m for m in run.data.metrics if not m.startswith("system/") and m not in live}
    # the model card is the registered version's, linked from its description to this run
    return metrics, {p for p in paths if not p.startswith(("images/", "card/"))}


def test_log_run_resends_every_stages_record(local: tuple[Path, str]) -> None:
    """`vae log-run` (after an outage) gives a run with the same metrics and artifacts as the
    pipeline's own: every stage of vae.outputs.STAGE_RECORDS, per-epoch rows included."""
    from vae.mlops import store
    from vae.outputs import STAGE_RECORDS

    root, uri = local
    client = store.client(uri)
    original = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    with project_env(root, uri):
        assert main(["-q", "log-run"]) == 0
    relogged = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    assert relogged != original  # the pipeline's run had finished: a new run
    metrics, artifacts = _record(client, relogged)
    assert (metrics, artifacts) == _record(client, original)
    for stage in STAGE_RECORDS:
        assert any(a.startswith(f"{stage}/") for a in artifacts), stage
    for stage in ("train", "evaluate", "export", "score", "register"):
        assert any(m.startswith(f"{stage}.") for m in metrics), stage
    history = client.get_metric_history(relogged, "val_nelbo")
    assert [m.step for m in history] == [1, 2]
