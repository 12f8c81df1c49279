from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import mlp_config
from vae.config import ExportConfig
from vae.core.model import VAE, embed
from vae.data.splits import Split, float_images
from vae.evaluation.export import embeddings_frame, export, latent_matrix, read_embeddings
from vae.evaluation.probes import downstream_metrics, knn_predict

SHAPE = (1, 8, 8)
CFG = ExportConfig(batch_size=7, knn_k=3, probe_max_iter=200)


def _model(latent_dim: int = 3, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(mlp_config(latent_dim=latent_dim, hidden_dim=16), image_shape=SHAPE)


def _bars(n: int, seed: int, n_classes: int = 4) -> Split:
    """n 8x8 uint8 images, class y a bright row band at rows 2y..2y+1, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    images = (torch.rand(n, *SHAPE, generator=g) * 60).to(torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 0, 2 * y : 2 * y + 2, 1:7] = 230
    return Split(images, labels)


def _splits() -> dict[str, Split]:
    return {"train": _bars(60, 1), "val": _bars(10, 2), "test": _bars(30, 3)}


def _columns(d: int) -> list[str]:
    return ["split", "index", "label", *(f"mu_{i}" for i in range(d))] + [
        f"logvar_{i}" for i in range(d)
    ]


def test_embed_is_the_posterior_mean_batched_on_cpu() -> None:
    model = _model()
    x = float_images(_bars(23, 0), "none", 0)
    mu, logvar = embed(model, x, batch_size=5)
    q = model.encode(x)
    assert mu.shape == logvar.shape == (23, 3)
    assert mu.dtype == logvar.dtype == torch.float32 and mu.device.type == "cpu"
    assert not mu.requires_grad
    assert torch.allclose(mu, q.mean, atol=1e-6) and torch.allclose(logvar, q.logvar, atol=1e-6)
    mu_one, _ = embed(model, x, batch_size=1000)
    assert torch.allclose(mu, mu_one, atol=1e-6)


def test_embeddings_frame_columns_and_dtypes() -> None:
    mu, logvar = torch.randn(5, 2), torch.randn(5, 2)
    df = embeddings_frame("val", torch.tensor([0, 1, 2, -1, 1]), mu, logvar)
    assert list(df.columns) == _columns(2) and len(df) == 5
    assert pd.api.types.is_string_dtype(df["split"]) and set(df["split"]) == {"val"}
    assert df["index"].dtype == "int64" and df["label"].dtype == "int64"
    assert all(df[c].dtype == "float32" for c in df.columns[3:])
    assert df["index"].tolist() == [0, 1, 2, 3, 4] and df["label"].tolist() == [0, 1, 2, -1, 1]
    assert torch.equal(latent_matrix(df), mu) and torch.equal(latent_matrix(df, "logvar"), logvar)
    with pytest.raises(ValueError, match="same 5 images"):
        embeddings_frame("val", torch.zeros(4, dtype=torch.long), mu, logvar)


@pytest.mark.parametrize("binarize", ["none", "dynamic"])
def test_export_parquet_round_trips(tmp_path: Path, binarize: str) -> None:
    model, splits = _model(), _splits()
    metrics = export(model, splits, binarize, replace(CFG, seed=3), tmp_path / "emb")
    for name, split in splits.items():
        df = read_embeddings(tmp_path / "emb" / f"{name}.parquet")
        assert list(df.columns) == _columns(3) and len(df) == len(split)
        assert pd.api.types.is_string_dtype(df["split"]) and set(df["split"]) == {name}
        assert df["index"].dtype == "int64" and df["index"].tolist() == list(range(len(split)))
        assert df["label"].dtype == "int64" and df["label"].tolist() == split.labels.tolist()
        assert all(df[c].dtype == "float32" for c in df.columns[3:])
        # grey pixels, also for binarized data: what `vae encode` gives for the same image
        q = model.encode(split.images.float() / 255.0)
        assert torch.allclose(latent_matrix(df), q.mean, atol=1e-6)
        assert torch.allclose(latent_matrix(df, "logvar"), q.logvar, atol=1e-6)
        assert metrics[f"rows_{name}"] == len(split)
    assert not list((tmp_path / "emb").glob(".*"))  # no temporary files left behind


SCORE_KEYS = (
    "linear_probe_accuracy",
    "knn_accuracy",
    "pixel_linear_probe_accuracy",
    "pixel_knn_accuracy",
    "grey_pixel_linear_probe_accuracy",
    "grey_pixel_knn_accuracy",
)


def test_export_metrics_keys_and_ranges(tmp_path: Path) -> None:
    model = _model()
    metrics = export(model, _splits(), "none", CFG, tmp_path, pixel_probe_max_rows=25)
    json.dumps(metrics)  # one JSON-serialisable dict
    for key in SCORE_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["latent_dim"] == 3 and metrics["knn_k"] == 3
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    assert metrics["linear_probe_train_rows"] == metrics["knn_train_rows"] == 60
    assert metrics["pixel_linear_probe_train_rows"] == 25
    assert metrics["pixel_knn_train_rows"] == 60 and metrics["test_rows"] == 30
    for key in ("seconds", "embed_seconds", "write_seconds", "knn_seconds", "pixel_knn_seconds"):
        assert metrics[key] >= 0.0
    # On the bars the pixel baseline is easy; a second run gives the same scores.
    assert metrics["pixel_knn_accuracy"] > 0.9 and metrics["pixel_linear_probe_accuracy"] > 0.9
    # without binarization the grey pixels are the pixels the model sees
    assert metrics["grey_pixel_knn_accuracy"] == metrics["pixel_knn_accuracy"]
    binarized = export(model, _splits(), "static", CFG, tmp_path, pixel_probe_max_rows=25)
    assert binarized["grey_pixel_knn_accuracy"] == metrics["grey_pixel_knn_accuracy"]
    again = export(model, _splits(), "none", CFG, tmp_path, pixel_probe_max_rows=25)
    assert {k: v for k, v in again.items() if "seconds" not in k} == {
        k: v for k, v in metrics.items() if "seconds" not in k
    }


def test_downstream_metrics_are_high_on_separable_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=g) * 10

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 4, (n,), generator=g)
        return centres[y] + torch.randn(n, 6, generator=g), y

    (xtr, ytr), (xte, yte) = draw(200), draw(100)
    out = downstream_metrics(xtr, ytr, xte, yte, CFG)
    assert out["linear_probe_accuracy"] >= 0.95 and out["knn_accuracy"] >= 0.95
    assert out["knn_train_rows"] == 200 and out["test_rows"] == 100
    # Shuffled labels carry no signal: near chance (0.25), far from the real scores.
    shuffled = downstream_metrics(xtr, ytr[torch.randperm(200, generator=g)], xte, yte, CFG)
    assert shuffled["knn_accuracy"] < 0.6


def test_knn_predict_matches_sklearn() -> None:
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(1)
    xtr, ytr = torch.randn(300, 5, generator=g), torch.randint(0, 3, (300,), generator=g)
    xte = torch.randn(50, 5, generator=g)
    ref = KNeighborsClassifier(n_neighbors=5, algorithm="brute").fit(xtr.numpy(), ytr.numpy())
    assert knn_predict(xtr, ytr, xte, 5).tolist() == ref.predict(xte.numpy()).tolist()
    assert knn_predict(xtr, ytr, xtr, 1).tolist() == ytr.tolist()  # each point is its own 1-NN


def test_unlabelled_rows_are_skipped_and_none_labelled_gives_none(tmp_path: Path) -> None:
    splits = _splits()
    half = splits["test"].labels.clone()
    half[::2] = -1
    out = downstream_metrics(
        torch.randn(60, 3), splits["train"].labels, torch.randn(30, 3), half, CFG
    )
    assert out["test_rows"] == 15 and 0.0 <= out["knn_accuracy"] <= 1.0

    unlabelled = {k: Split(s.images, torch.full_like(s.labels, -1)) for k, s in splits.items()}
    metrics = export(_model(), unlabelled, "none", CFG, tmp_path)
    json.dumps(metrics)
    for key in ("linear_probe_accuracy", "knn_accuracy", "pixel_knn_accuracy"):
        assert metrics[key] is None
    assert metrics["pixel_linear_probe_accuracy"] is None and metrics["test_rows"] == 0
    df = read_embeddings(tmp_path / "test.parquet")
    assert (df["label"] == -1).all() and len(df) == 30


def test_export_without_a_test_split(tmp_path: Path) -> None:
    metrics = export(_model(), {"train": _bars(12, 0)}, "none", CFG, tmp_path)
    assert metrics["knn_accuracy"] is None and metrics["rows_train"] == 12
    assert (tmp_path / "train.parquet").is_file()


def test_one_class_probe_predicts_that_class() -> None:
    y = torch.zeros(20, dtype=torch.long)
    out = downstream_metrics(torch.randn(20, 2), y, torch.randn(10, 2), y[:10], CFG)
    assert out["linear_probe_accuracy"] == 1.0 and out["knn_accuracy"] == 1.0
