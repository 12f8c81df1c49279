"""``vae encode | sample | reconstruct`` end to end on tiny data, in this venv (see
tests/e2e/test_fresh_venv_consumer.py for the fresh-venv run): outputs equal the pyfunc's, bad
inputs are one line, nothing is lost, and no command creates an empty ``mlflow.db``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import idx_bytes, tiny_vae
from vae.cli import main

pytestmark = pytest.mark.slow  # each test starts MLflow; the 100k-image one streams for real

NAME = "cli-vae"
LATENT = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, torch.nn.Module]]:
    """A SQLite store with NAME v1 = champion; yields (tracking URI, run id, model)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from vae.mlops.packaging import log_model

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    model = tiny_vae(LATENT)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("cli")).info.run_id
    mlflow.register_model(log_model(model, run_id), NAME)
    client.set_registered_model_alias(NAME, "champion", "1")
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI")
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
    yield uri, run_id, model


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory outside any project, with no tracking URI in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _posterior(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(pixels.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    with torch.no_grad():
        q = model.encode(x)
    return torch.cat([q.mean, q.logvar], 1).numpy()


def _write_inputs(folder: Path) -> np.ndarray:
    """3 grey PNGs, 2 RGB PNGs (converted to grey), 1 JPEG in a sub-folder, and an IDX file."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    (folder / "pngs" / "sub").mkdir(parents=True)
    for i, img in enumerate(pixels):
        mode = "L" if i < 3 else "RGB"
        Image.fromarray(img).convert(mode).save(folder / "pngs" / f"{i}.png")
    Image.fromarray(pixels[0]).save(folder / "pngs" / "sub" / "j.jpg", quality=95)
    idx = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    (folder / "t.idx3-ubyte").write_bytes(idx_bytes(torch.from_numpy(idx)))
    return np.concatenate([pixels, idx])


def test_encode_any_model_uri_equals_the_pyfunc(store, elsewhere: Path) -> None:
    from mlflow.tracking._tracking_service import utils as mlflow_uris

    uri, run_id, model = store
    pixels = _write_inputs(elsewhere)
    before = mlflow_uris._tracking_uri
    for i, model_uri in enumerate(
        (f"models:/{NAME}@champion", f"models:/{NAME}/1", f"runs:/{run_id}/model")
    ):
        out = f"e{i}.parquet"
        args = ["encode", "--model", model_uri, "--tracking-uri", uri, "pngs", "t.idx3-ubyte"]
        assert main([*args, "--out", out, "--batch-size", "4"]) == 0
        table = pd.read_parquet(out)
        sources = [f"pngs/{k}.png" for k in range(5)] + ["pngs/sub/j.jpg"]
        assert list(table["source"]) == sources + [f"t.idx3-ubyte#{k}" for k in range(7)]
        columns = [f"mu_{k}" for k in range(LATENT)] + [f"logvar_{k}" for k in range(LATENT)]
        assert list(table.columns) == ["source", *columns]
        assert all(table[c].dtype == np.float32 for c in columns)
        got = table[columns].to_numpy()
        keep = [k for k in range(13) if k != 5]  # the JPEG is lossy: checked loosely below
        expected = _posterior(model, np.concatenate([pixels[:5], pixels[5:]]))
        np.testing.assert_allclose(got[keep], expected, rtol=1e-5, atol=1e-5)
        assert np.abs(got[5] - got[0]).max() < 0.5
    # a library call leaves the caller's MLflow pointed where it was
    assert mlflow_uris._tracking_uri == before and "MLFLOW_TRACKING_URI" not in os.environ


def test_bad_inputs_are_one_line_and_lose_nothing(store, elsewhere: Path, capsys) -> None:
    uri, _, _ = store
    _write_inputs(elsewhere)
    Image.fromarray(np.zeros((32, 30), np.uint8)).save(elsewhere / "pngs" / "z_big.png")
    (elsewhere / "e.parquet").write_bytes(b"the user's earlier table")
    base = ["encode", "--model", f"models:/{NAME}@champion", "--tracking-uri", uri]
    for inputs, message in (
        (["pngs"], "pngs/z_big.png: image is 30x32, the model expects 28x28"),
        (["missing.png"], "missing.png: no such file or folder"),
        (["t.idx3-ubyte", "notes.txt"], "notes.txt: not a readable image"),
    ):
        (elsewhere / "notes.txt").write_text("hello")
        capsys.readouterr()
        assert main([*base, *inputs, "--out", "e.parquet"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert (elsewhere / "e.parquet").read_bytes() == b"the user's earlier table"
    assert sorted(p.name for p in elsewhere.iterdir() if p.name.startswith(".")) == []


def test_no_store_no_empty_database(store, elsewhere: Path, capsys) -> None:
    args = ["sample", "--model", f"models:/{NAME}@champion", "--out", "s.png"]
    assert main(args) == 1
    assert "Set MLFLOW_TRACKING_URI or pass --tracking-uri" in capsys.readouterr().err
    assert main([*args, "--tracking-uri", "sqlite:///other.db"]) == 1
    assert "does not exist (not creating it)" in capsys.readouterr().err
    assert main(["sample", "--model", "models:/nope@champion", "--tracking-uri", store[0],
                 "--out", "s.png"]) == 1  # fmt: skip
    assert "models:/nope@champion: cannot load" in capsys.readouterr().err
    args = ["sample", "--model", f"models:/{NAME}@champion", "--tracking-uri", store[0]]
    assert main([*args, "-n", "10001", "--out", "s.png"]) == 1
    assert "more than this model's max_rows of 10000" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []


def test_sample_and_reconstruct_grids(store, elsewhere: Path) -> None:
    uri, _, model = store
    _write_inputs(elsewhere)
    base = ["--model", f"models:/{NAME}@champion", "--tracking-uri", uri]
    assert main(["sample", *base, "-n", "10", "--out", "a.png", "--seed", "1"]) == 0
    assert main(["sample", *base, "-n", "10", "--out", "b.png", "--seed", "1"]) == 0
    assert main(["sample", *base, "-n", "10", "--out", "c.png", "--seed", "1", "--sample"]) == 0
    a, b, c = (np.asarray(Image.open(f"{k}.png")) for k in "abc")
    assert a.shape == (2 * 30 + 2, 8 * 30 + 2)  # 10 images, 8 a row, 2-pixel gaps
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(np.unique(c[2:30, 2:30])) <= {0, 255}  # Bernoulli samples are 0 or 1
    with torch.no_grad():
        mean = model.generate(10, torch.Generator().manual_seed(1), mean=True)
    np.testing.assert_array_equal(a[2:30, 2:30], (mean[0, 0].numpy() * 255 + 0.5).astype(np.uint8))
    assert main(["reconstruct", *base, "pngs", "--out", "r.png", "-n", "4"]) == 0
    r = np.asarray(Image.open("r.png"))
    assert r.shape == (2 * 30 + 2, 8 * 30 + 2)  # a row of originals over their decodings
    first = np.asarray(Image.open("pngs/0.png"))
    np.testing.assert_array_equal(r[2:30, 2:30], first)


def test_encode_streams_100k_idx_images_in_bounded_memory(store, tmp_path: Path) -> None:
    """Peak RSS of ``vae encode`` on 100,000 IDX images stays under 1.5 GB."""
    uri, _, _ = store
    n = 100_000
    rng = np.random.default_rng(0)
    with open(tmp_path / "big.idx3-ubyte", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)))
        for _ in range(10):
            f.write(rng.integers(0, 256, (n // 10, 28, 28), dtype=np.uint8).tobytes())
    measure = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]);"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    cmd = [sys.executable, "-m", "vae", "encode", "--model", f"models:/{NAME}@champion"]
    cmd += ["--tracking-uri", uri, "big.idx3-ubyte", "--out", "e.parquet", "--no-progress"]
    out = subprocess.run(
        [sys.executable, "-c", measure, *cmd],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    code, peak_kib = map(int, out.stdout.split())
    assert code == 0, out.stderr
    print(f"vae encode, {n} IDX images: peak RSS {peak_kib / 1024:.0f} MiB")
    assert peak_kib < 1.5e9 / 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "e.parquet").metadata.num_rows == n


def test_the_core_imports_nothing_from_the_extras(store, tmp_path: Path) -> None:
    """The consumer path runs with DVC, Prefect, torchvision and matplotlib made unimportable."""
    uri = store[0]
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    code = """
import sys
BLOCKED = ("dvc", "prefect", "torchvision", "matplotlib", "pipelines")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the core imported {name}")
sys.meta_path.insert(0, Block())
from vae.cli import main
for args in (["encode", "a.png", "--out", "e.parquet"], ["sample", "--out", "s.png"],
             ["reconstruct", "a.png", "--out", "r.png"]):
    assert main([args[0], "--model", "models:/NAME@champion", *args[1:]]) == 0, args
""".replace("NAME", NAME)
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
