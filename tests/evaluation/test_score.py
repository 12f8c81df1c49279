"""The classify and score stages, end to end through the CLI on tiny data."""

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
from vae.evaluation.score import classify, load_classifier, save_classifier

SETS = {"real_train", "prior_mean", "prior_sample", "gmm_mean", "gmm_sample", "reconstruction"}


@pytest.mark.slow
def test_classify_then_score_write_their_metrics(project: Path) -> None:
    for stage in ("prepare", "train", "generate", "classify", "score"):
        assert main(["-q", stage]) == 0, stage
    classifier = json.loads(Path("metrics/classifier.json").read_text())
    assert 0.0 <= classifier["test_accuracy"] <= 1.0
    q = json.loads(Path("metrics/quality.json").read_text())
    assert set(q["sets"]) == SETS
    assert q["sampler"] == "gmm" and q["reference"] == "grey test images"
    assert q["classifier_test_accuracy"] == classifier["test_accuracy"]
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


def test_the_classifier_file_round_trips(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    images = torch.zeros(40, 1, 8, 8, dtype=torch.uint8)
    images[labels == 0, :, :, :4] = 200  # class 0 bright on the left, class 1 on the right
    images[labels == 1, :, :, 4:] = 200
    images += (torch.rand(images.shape, generator=g) * 40).to(torch.uint8)
    split = Split(images, labels)
    cfg = ScoreConfig(
        classifier_epochs=10, classifier_batch_size=8, classifier_lr=1e-2, classifier_features=8
    )
    net, metrics = classify(split, split, cfg)
    assert net is not None and metrics["test_accuracy"] == 1.0
    save_classifier(tmp_path / "c.pt", net, metrics)
    back, back_metrics = load_classifier(tmp_path / "c.pt")
    assert back is not None and back_metrics == metrics
    x = images.float() / 255
    with torch.no_grad():
        torch.testing.assert_close(back.features(x), net.features(x))
