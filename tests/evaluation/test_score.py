"""The classify and score stages, end to end through the CLI on tiny data, and the fixed
feature network they measure with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import TINY_PARAMS
from vae.cli import main
from vae.config import ScoreConfig
from vae.data.splits import Split
from vae.evaluation.score import (
    SHIPPED_SHA256,
    classify,
    file_sha256,
    load_feature_net,
    shipped_feature_net,
)

SETS = {"real_train", "prior_mean", "prior_sample", "gmm_mean", "gmm_sample", "reconstruction"}
SETS |= {"diffusion_mean", "diffusion_sample"}
SETS |= {f"{name}_mean_t{t}" for name in ("prior", "diffusion") for t in ("0.9", "1.1", "1.2")}


@pytest.mark.slow
def test_classify_then_score_write_their_metrics(project: Path) -> None:
    for stage in ("prepare", "train", "generate", "classify", "score"):
        assert main(["-q", stage]) == 0, stage
    classifier = json.loads(Path("metrics/classifier.json").read_text())
    assert 0.0 <= classifier["test_accuracy"] <= 1.0
    # tiny "fashion_mnist" data: the shipped network, its very bytes
    assert classifier["feature_net"] == "shipped"
    assert classifier["sha256"] == SHIPPED_SHA256["fashion_mnist"]
    assert file_sha256("models/feature_net.safetensors") == classifier["sha256"]
    q = json.loads(Path("metrics/quality.json").read_text())
    assert set(q["sets"]) == SETS
    assert q["sampler"] == "diffusion" and q["reference"] == "grey test images"
    assert q["feature_net_sha256"] == classifier["sha256"] and q["feature_net"] == "shipped"
    for name, m in q["sets"].items():
        assert m["n"] == TINY_PARAMS["score"]["n_samples"], name
        assert m["fid"] >= 0.0 and 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
    # the same inputs score the same: everything is seeded
    assert main(["-q", "score"]) == 0
    assert json.loads(Path("metrics/quality.json").read_text())["sets"] == q["sets"]


def test_a_dataset_without_labels_skips_with_a_note(tmp_path: Path, monkeypatch) -> None:
    """A folder of images with no class sub-folders: no classifier, no scores, no crash."""
    src = tmp_path / "imgs"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(60):
        pixels = (torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(src / f"{i}.png")
    params = {k: dict(v) for k, v in TINY_PARAMS.items()}
    params["data"].update(dataset="folder", source=str(src))
    params["train"].update(batch_size=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "ingest"]) == 0
    for stage in ("prepare", "train", "generate", "classify", "score"):
        assert main(["-q", stage]) == 0, stage
    note = json.loads(Path("metrics/classifier.json").read_text())
    assert "no class labels" in note["skipped"]
    assert json.loads(Path("metrics/quality.json").read_text()) == note


def _two_class_split() -> Split:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    images = torch.zeros(40, 1, 8, 8, dtype=torch.uint8)
    images[labels == 0, :, :, :4] = 200  # class 0 bright on the left, class 1 on the right
    images[labels == 1, :, :, 4:] = 200
    images += (torch.rand(images.shape, generator=g) * 40).to(torch.uint8)
    return Split(images, labels)


def test_a_trained_feature_network_round_trips_and_is_the_same_file_twice(tmp_path: Path) -> None:
    split = _two_class_split()
    cfg = ScoreConfig(
        feature_net="train",
        classifier_epochs=10,
        classifier_batch_size=8,
        classifier_lr=1e-2,
        classifier_features=8,
    )
    metrics = classify(split, split, cfg, "folder", tmp_path / "a.safetensors")
    assert metrics["feature_net"] == "trained" and metrics["test_accuracy"] == 1.0
    assert metrics["sha256"] == file_sha256(tmp_path / "a.safetensors")
    back, info = load_feature_net(tmp_path / "a.safetensors")
    assert back is not None and info["test_accuracy"] == 1.0 and info["dataset"] == "folder"
    assert info["settings"]["epochs"] == 10
    # seeded, and the file holds no timings: the same data and settings, the same bytes
    again = classify(split, split, cfg, "folder", tmp_path / "b.safetensors")
    assert again["sha256"] == metrics["sha256"]
    twin, _ = load_feature_net(tmp_path / "b.safetensors")
    x = split.images.float() / 255
    with torch.no_grad():
        assert torch.equal(back.features(x), twin.features(x))


def test_the_shipped_network_is_checked_and_used_for_fashion_mnist_only(tmp_path: Path) -> None:
    path = shipped_feature_net("fashion_mnist")
    assert path is not None and file_sha256(path) == SHIPPED_SHA256["fashion_mnist"]
    assert path.stat().st_size < 2_000_000  # small enough for git
    net, info = load_feature_net(path)
    assert net is not None and net.image_shape == (1, 28, 28) and net.head.out_features == 10
    assert sum(p.numel() for p in net.parameters()) < 450_000
    assert info["dataset"] == "fashion_mnist" and info["test_accuracy"] > 0.91
    assert shipped_feature_net("mnist") is None and shipped_feature_net("folder") is None
    # the other data gets a trained one; fashion_mnist with feature_net: train too
    split = _two_class_split()
    cfg = ScoreConfig(feature_net="auto", classifier_epochs=1, classifier_features=8)
    assert classify(split, split, cfg, "folder", tmp_path / "f.st")["feature_net"] == "trained"


def test_a_changed_shipped_network_is_refused(tmp_path: Path, monkeypatch) -> None:
    import vae.evaluation.score as score_module

    fake = tmp_path / "nets"
    fake.mkdir()
    (fake / "fashion_mnist.safetensors").write_bytes(
        b"version https://git-lfs.github.com/spec/v1\n"
    )
    monkeypatch.setattr(score_module, "SHIPPED_DIR", fake)
    with pytest.raises(ValueError, match=r"not the shipped feature network.*git checkout"):
        shipped_feature_net("fashion_mnist")
    (fake / "fashion_mnist.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        shipped_feature_net("fashion_mnist")
