"""``vae encode --engine spark`` (local[2]) writes the table that ``vae encode`` writes.

Spark starts once for the module (the ``spark`` fixture): ``encode_with_spark`` runs in the
active session when there is one, so the jobs share its JVM and its Python workers, which pay
for importing torch and mlflow once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_PARAMS
from vae.cli import main

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these

JAVA = os.environ.get("JAVA_HOME") or shutil.which("java")
needs_java = pytest.mark.skipif(
    JAVA is None, reason="no Java: `make java` installs openjdk-17-jre-headless"
)


def _write_pngs(folder: Path, n: int, seed: int) -> None:
    """Grey PNGs, and every fourth one RGB in a sub-folder (with an upper-case suffix), so
    that the folder walk, the suffix filter and the mode conversion are all exercised."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "rgb").mkdir(parents=True)
    for i in range(n):
        if i % 4 == 0:
            pixels = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "rgb" / f"c{i}.PNG")
        else:
            pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"grey {i}.png")  # a space: no URI escaping
    (folder / "notes.txt").write_text("not an image: the folder walk skips it\n")


def make_store(root: Path, n_images: int = 40) -> tuple[Path, str, str]:
    """A store in ``root`` with one tiny logged model, ``n_images`` PNGs in ``imgs/`` and one
    more file alone; returns (root, tracking URI, model URI)."""
    from mlflow.tracking import MlflowClient

    from vae.config import ModelConfig
    from vae.core.model import VAE
    from vae.mlops.packaging import log_model
    from vae.serving.consume import _using_store

    uri = f"sqlite:///{root / 'mlflow.db'}"
    torch.manual_seed(0)
    model = VAE(ModelConfig(**TINY_PARAMS["model"]), (1, 28, 28))
    client = MlflowClient(tracking_uri=uri)
    artifacts = (root / "mlruns").as_uri()  # in root, not the working folder's ./mlruns
    run = client.create_run(client.create_experiment("spark", artifact_location=artifacts))
    # log_model reads MLFLOW_TRACKING_URI and sets MLflow's global URI: both restored after.
    with _using_store(uri):
        model_uri = log_model(model, run.info.run_id)
    _write_pngs(root / "imgs", n_images, seed=0)
    _write_pngs(root / "alone", 1, seed=1)
    return root, uri, model_uri


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    return make_store(tmp_path_factory.mktemp("spark"))


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    from vae.serving.spark import spark_session

    session, _ = spark_session("local[2]")  # what encode_with_spark would start, same conf
    yield session
    session.stop()


def _encode(store: tuple[Path, str, str], out: Path, *inputs: str, spark: bool) -> int:
    _, uri, model_uri = store
    engine = ["--engine", "spark", "--master", "local[2]"] if spark else ["--no-progress"]
    args = ["encode", "--model", model_uri, "--tracking-uri", uri, *engine, *inputs]
    return main(["-q", *args, "--out", str(out)])


def _table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path).sort_values("source").reset_index(drop=True)


@needs_java
def test_spark_matches_local_engine(
    store: tuple[Path, str, str], spark: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vae.serving.consume import embedding_columns

    root = store[0]
    monkeypatch.chdir(root)  # a relative folder and an absolute file: sources spelled as given
    inputs = ("imgs", str(root / "alone" / "rgb" / "c0.PNG"))
    assert _encode(store, root / "local.parquet", *inputs, spark=False) == 0
    (root / "emb").mkdir()  # an earlier Spark output, which the run replaces
    (root / "emb" / "_SUCCESS").write_bytes(b"")
    (root / "emb" / "part-00000-old.snappy.parquet").write_bytes(b"PAR1 old")
    assert _encode(store, root / "emb", *inputs, spark=True) == 0

    expected, got = _table(root / "local.parquet"), _table(root / "emb")
    assert list(got.columns) == embedding_columns(TINY_PARAMS["model"]["latent_dim"])
    assert len(got) == 41 and got["source"].tolist() == expected["source"].tolist()
    assert got["source"].iloc[0] == str(root / "alone" / "rgb" / "c0.PNG")
    assert "imgs/rgb/c0.PNG" in set(got["source"])
    assert (got.dtypes.iloc[1:] == np.float32).all()
    np.testing.assert_allclose(
        got.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), rtol=1e-5, atol=1e-6
    )
    parts = [p.name for p in (root / "emb").iterdir() if p.name.startswith("part-")]
    assert parts and "part-00000-old.snappy.parquet" not in parts


@needs_java
@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("small.png", "image is 20x20, the model expects 28x28"),
        (
            "bomb.png",
            "the header declares 400,000,000 pixels, over the limit of 16,777,216 "
            "(--max-pixels); not decoded",
        ),
    ],
)
def test_a_bad_image_names_the_file(
    store: tuple[Path, str, str],
    spark: object,
    capsys: pytest.CaptureFixture[str],
    name: str,
    line: str,
) -> None:
    """A wrong size, or a header declaring too many pixels (refused on the executor before it
    is decoded): one line naming the file, and the earlier output left alone."""
    from tests.data.hostile_images import header_only_png

    root = store[0]
    bad = root / f"bad-{name}"
    shutil.copytree(root / "imgs", bad)
    if name == "small.png":
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(bad / name)
    else:
        (bad / name).write_bytes(header_only_png(20000, 20000))
    earlier = root / f"earlier-{name}"  # an earlier Spark output, which a failed run keeps
    earlier.mkdir()
    (earlier / "_SUCCESS").write_bytes(b"")
    (earlier / "part-00000-a.snappy.parquet").write_bytes(b"PAR1 earlier")
    capsys.readouterr()
    assert _encode(store, earlier, str(bad), spark=True) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"vae encode: error: {bad / name}: {line}"
    assert sorted(p.name for p in earlier.iterdir()) == ["_SUCCESS", "part-00000-a.snappy.parquet"]
    assert (earlier / "part-00000-a.snappy.parquet").read_bytes() == b"PAR1 earlier"
    assert not list(root.glob(f".earlier-{name}.*"))  # the job's own folder is gone


@needs_java  # checked before the refusals
def test_refusals_before_spark_starts(
    store: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's folder is never overwritten, and IDX files are refused, with one line each."""
    root = store[0]
    mine = root / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me\n")
    assert _encode(store, mine, str(root / "imgs"), spark=True) == 1
    assert "is not a Spark output; not overwriting it" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "keep me\n"

    idx = root / "train-images-idx3-ubyte"
    idx.write_bytes(b"\x00\x00\x08\x03" + bytes(12))
    assert _encode(store, root / "idx_emb", str(idx), spark=True) == 1
    err = capsys.readouterr().err
    assert f"{idx}: IDX files are not supported by --engine spark" in err


def test_missing_pyspark_or_java_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vae.serving.consume import ConsumerError
    from vae.serving.spark_session import require_spark

    # The core install: `import vae.serving.spark` works, and the command says what to install.
    code = (
        "import sys; sys.modules['pyspark'] = None; import vae.serving.spark; "
        "from vae.cli import main; "
        "sys.exit(main(['encode', '--engine', 'spark', '--model', 'm', 'x.png', '--out', 'o']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == (
        "vae encode: error: --engine spark needs pyspark: pip install 'vae[spark]'"
    )
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConsumerError, match="apt-get install openjdk-17-jre-headless"):
        require_spark()


def test_benchmark_writes_the_pngs_once(tmp_path: Path) -> None:
    """benchmarks/encode_engines.py's data step (its timings need the real data: not here)."""
    import importlib.util

    from tests.conftest import REPO, write_idx_dataset

    path = REPO / "benchmarks" / "encode_engines.py"
    spec = importlib.util.spec_from_file_location("encode_engines", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    dataset, out = write_idx_dataset(tmp_path / "idx", n_train=6, n_test=3), tmp_path / "png"
    assert bench.write_pngs(dataset, out, limit=8) == 8
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert names == ["test/00000.png", "test/00001.png"] + [f"train/{i:05d}.png" for i in range(6)]
    stamp = (out / "train" / "00000.png").stat().st_mtime_ns
    assert bench.write_pngs(dataset, out, limit=None) == 9  # adds the one missing image
    assert (out / "train" / "00000.png").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="holds 9 PNG files, this run wants 4"):
        bench.write_pngs(dataset, out, limit=4)
