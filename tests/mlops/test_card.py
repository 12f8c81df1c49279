"""The model card: built from the pipeline's files alone, every picture inline and decodable."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_vae
from vae.evaluation.summary import headline_set
from vae.mlops.card import card_facts, card_tags, render_card

QUALITY = {
    "sampler": "diffusion",
    "temperature": 1.2,
    "feature_net_sha256": "3268" * 16,
    "sets": {
        "real_train": {"fid": 1.4, "precision": 0.83, "recall": 0.84},
        "prior_mean": {"fid": 108.9, "precision": 0.94, "recall": 0.12},
        "diffusion_mean": {"fid": 113.3, "precision": 0.95, "recall": 0.09},
        "diffusion_mean_t1.2": {"fid": 77.2, "precision": 0.93, "recall": 0.16},
        "reconstruction": {"fid": 103.6, "precision": 0.96, "recall": 0.09},
    },
}
EVAL = {"nll_iw": 229.17, "elbo": -231.0, "kl": 16.1, "elbo_gap": 1.83, "active_units": 17}
EVAL |= {"iw_samples": 500}
DECISION = {
    "name": "vae-x",
    "version": 3,
    "run_id": "abc123",
    "promoted": True,
    "reason": "nll_iw 229.170 < champion v1's 229.500 nats",
    "previous_champion_version": 1,
}
MANIFEST = {"dataset": "fashion_mnist", "dataset_sha256": "ab" * 32}
MANIFEST |= {
    "splits": {"train": {"count": 54000}, "val": {"count": 6000}, "test": {"count": 10000}}
}


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    f = {k: tmp_path / k for k in ("metrics", "reports", "plots")}
    for p in f.values():
        p.mkdir()
    (f["metrics"] / "eval.json").write_text(json.dumps(EVAL))
    (f["metrics"] / "quality.json").write_text(json.dumps(QUALITY))
    (f["metrics"] / "downstream.json").write_text(
        json.dumps({"knn_accuracy": 0.865, "linear_probe_accuracy": 0.831})
    )
    rng = np.random.default_rng(0)
    for name in ("samples", "reconstructions", "interpolations", "latent_2d"):
        pixels = (rng.random((30, 40)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(f["reports"] / f"{name}.png")
    with open(f["plots"] / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "train_elbo", "val_nelbo"])
        w.writerows([[1, -260.0, 255.0], [2, -240.0, 238.0], [3, -235.0, 233.0]])
    return f


def _card(folders: dict[str, Path], others: dict | None = None) -> str:
    facts = card_facts(
        tiny_vae(),
        DECISION,
        folders,
        MANIFEST,
        {"dvc.prepared.md5": "9f" * 16 + ".dir"},
        "/usr/share/datasets/fashion-mnist",
        others or {},
    )
    return render_card(facts)


def test_the_card_is_one_page_whose_pictures_are_inline_and_not_blank(folders) -> None:
    page = _card(folders)
    assert "http" not in page.split("<h2>How to use it</h2>")[0], "nothing fetched"
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)">', page)
    assert len(images) == 5, [alt for alt, _ in images]  # 4 report PNGs and the curves
    for alt, data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            pixels = np.asarray(im.convert("L"), dtype=float)
        assert pixels.std() > 1, f"{alt} is blank"
    for text in ("fashion_mnist", "54000", "9f9f", "promoted to champion", "K = 500"):
        assert text in page, text
    for use in ("mlflow.pyfunc.load_model", "/invocations", "vae encode", "--engine spark"):
        assert use in page, use


def test_the_card_follows_the_metrics_files(folders) -> None:
    """Every number comes from the files: change one, the card changes with it."""
    before = _card(folders)
    assert '<td class="n">229.17</td>' in before and "77.2" in before and "103.6" in before
    (folders["metrics"] / "eval.json").write_text(json.dumps({**EVAL, "nll_iw": 228.04}))
    (folders["metrics"] / "quality.json").write_text(
        json.dumps({**QUALITY, "sets": {**QUALITY["sets"], "reconstruction": {"fid": 99.9}}})
    )
    after = _card(folders)
    assert '<td class="n">228.04</td>' in after and '<td class="n">229.17</td>' not in after
    assert "99.9" in after and "103.6" not in after


def test_a_two_layer_card_gives_active_units_and_kl_per_layer(folders) -> None:
    """Two layers: the active units and the KL rows name each layer's share, [z1, z2]."""
    assert "z1, z2" not in _card(folders)  # one layer: eval.json has no per-layer lists
    two = {**EVAL, "active_units": 36, "active_units_per_layer": [20, 16]}
    two |= {"kl_per_layer": [5.84, 13.23], "kl": 19.07}
    (folders["metrics"] / "eval.json").write_text(json.dumps(two))
    page = _card(folders)
    assert "<tr><th>active units (z1, z2: 20, 16)</th>" in page
    assert "KL(q || p) (nats) (z1, z2: 5.84, 13.23)</th>" in page


def test_the_card_compares_with_the_champion_it_was_gated_against(folders) -> None:
    champion = {"nll_iw": "229.5", "fid": "70.0", "knn_accuracy": "0.86"}
    page = _card(folders, {"champion before (v1)": champion})
    row = re.search(r"<tr><th>&minus;log p\(x\).*?</tr>", page).group(0)
    assert '<td class="n better">229.50</td>' in row, row  # this version's nll_iw is lower
    fid = re.search(r"<tr><th>Fréchet distance of samples</th>.*?</tr>", page).group(0)
    assert '<td class="n worse">70.0</td>' in fid, fid
    assert "champion before (v1)" in page


def test_card_tags_are_the_chosen_samplers_headline(folders) -> None:
    assert headline_set(QUALITY) == "diffusion_mean_t1.2"
    assert headline_set({**QUALITY, "temperature": 1.0}) == "diffusion_mean"
    tags = card_tags(folders["metrics"])
    assert tags == {
        "fid": "77.2",
        "precision": "0.93",
        "recall": "0.16",
        "knn_accuracy": "0.865",
        "linear_probe_accuracy": "0.831",
    }
