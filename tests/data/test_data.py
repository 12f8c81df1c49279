from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import idx_bytes, write_idx_dataset
from vae.config import DataConfig
from vae.data.prepare import prepare
from vae.data.raw import (
    check_source,
    download,
    ingest,
    read_idx,
    read_source,
)
from vae.data.splits import DataError, DataUnavailable, load_split


def test_idx_round_trip(tmp_path: Path) -> None:
    arr = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    plain, h1 = read_idx(tmp_path / "a", 3)
    packed, h2 = read_idx(tmp_path / "a.gz", 3)
    assert torch.equal(plain, arr) and torch.equal(packed, arr)
    assert h1 == h2, "the hash is of the content, so gzip or not does not matter"


def test_truncated_idx_names_the_file(tmp_path: Path) -> None:
    data = idx_bytes(torch.zeros(4, 28, 28, dtype=torch.uint8))
    (tmp_path / "t").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"t: truncated or corrupt IDX file"):
        read_idx(tmp_path / "t", 3)


def test_corrupt_gzip_names_the_file(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(torch.zeros(4, 28, 28, dtype=torch.uint8)))
    (tmp_path / "c.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"c\.gz: cannot read"):
        read_idx(tmp_path / "c.gz", 3)


def test_wrong_magic_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "m").write_bytes(idx_bytes(torch.zeros(3, dtype=torch.uint8)))
    with pytest.raises(DataError, match=r"m: wrong IDX magic number 00000801"):
        read_idx(tmp_path / "m", 3)


def test_label_count_mismatch(tmp_path: Path) -> None:
    folder = write_idx_dataset(tmp_path / "raw", gz=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(torch.zeros(7, dtype=torch.uint8)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: 7 labels but"):
        prepare(DataConfig(), tmp_path / "out", raw_dir=tmp_path / "raw")
    assert not (tmp_path / "out").exists(), "a failed prepare writes nothing"


def test_missing_idx_files_are_named(tmp_path: Path) -> None:
    folder = write_idx_dataset(tmp_path / "src")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"src: missing IDX file\(s\) t10k-labels-idx1-ubyte"):
        read_source("fashion_mnist", folder)


def test_missing_source_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vae.data.raw

    debian = tmp_path / "usr-share-datasets-fashion-mnist"  # Debian's path, not installed
    monkeypatch.setitem(vae.data.raw.DEBIAN_SOURCES, "fashion_mnist", (str(debian), "dataset-x"))
    with pytest.raises(DataError) as info:
        check_source("fashion_mnist", debian)
    assert f"data.source: {debian} not found" in str(info.value)
    assert "apt-get install -y dataset-x" in str(info.value) and "vae download" in str(info.value)
    with pytest.raises(DataError, match=r"point data\.source at a folder of images"):
        check_source("folder", tmp_path / "no-images")


def test_ingest_copies_the_source_exactly(tmp_path: Path) -> None:
    src = write_idx_dataset(tmp_path / "src", n_train=60, n_test=20)
    (src / ".hidden").write_text("copied too, so DVC hashes the copy as it hashes the source")
    summary = ingest("fashion_mnist", src, tmp_path / "data" / "raw")
    copied = {
        p.relative_to(tmp_path / "data" / "raw"): p.read_bytes()
        for p in (tmp_path / "data" / "raw").rglob("*")
    }
    assert copied == {p.relative_to(src): p.read_bytes() for p in src.rglob("*")}
    assert summary["images"] == {"train": 60, "test": 20} and summary["files"] == 4
    # a second ingest replaces the copy: a file removed from the source goes from the copy too
    (src / ".hidden").unlink()
    ingest("fashion_mnist", src, tmp_path / "data" / "raw")
    assert not (tmp_path / "data" / "raw" / ".hidden").exists()
    assert [p.name for p in tmp_path.joinpath("data").iterdir()] == ["raw"], "no temporaries"


def test_ingest_of_corrupt_data_writes_nothing(tmp_path: Path) -> None:
    src = write_idx_dataset(tmp_path / "src", n_train=60, n_test=20)
    out = tmp_path / "data" / "raw"
    ingest("fashion_mnist", src, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    data = (src / "train-images-idx3-ubyte.gz").read_bytes()
    (src / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: cannot read"):
        ingest("fashion_mnist", src, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.joinpath("data").iterdir()] == ["raw"], "no temporaries"


def test_failed_download_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataUnavailable, match="no network"):  # may work later: retryable
        download("fashion_mnist", tmp_path / "dl")
    assert not (tmp_path / "dl").exists()
    with pytest.raises(DataError, match="nothing to download"):
        download("folder", tmp_path / "dl")


@pytest.mark.parametrize("binarize", ["dynamic", "static", "none"])
def test_prepare_writes_splits_and_manifest(tmp_path: Path, binarize: str) -> None:
    write_idx_dataset(tmp_path / "raw", n_train=100, n_test=30)
    cfg = DataConfig(val_fraction=0.2, binarize=binarize)  # type: ignore[arg-type]
    manifest = prepare(cfg, tmp_path / "out", raw_dir=tmp_path / "raw")
    assert manifest["splits"]["train"]["count"] == 80
    assert manifest["splits"]["val"]["count"] == 20
    assert manifest["splits"]["test"] == {"count": 30, "shape": [30, 1, 28, 28]}
    assert len(manifest["raw_sha256"]) == 4 and len(manifest["dataset_sha256"]) == 64
    train = load_split(tmp_path / "out" / "train.pt")
    assert train.images.dtype == torch.uint8 and train.images.shape == (80, 1, 28, 28)
    values = set(train.images.unique().tolist())
    assert (values <= {0, 255}) == (binarize == "static")
    again = prepare(cfg, tmp_path / "again", raw_dir=tmp_path / "raw")
    assert again == manifest
    assert torch.equal(
        load_split(tmp_path / "again" / "val.pt").images,
        load_split(tmp_path / "out" / "val.pt").images,
    ), "the split is seeded"


def _png(path: Path, size: tuple[int, int] = (8, 8), value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


def test_image_folder_dataset(tmp_path: Path) -> None:
    for cls in ("cats", "dogs"):
        for i in range(10):
            _png(tmp_path / "imgs" / cls / f"{i}.png", value=20 * i)
    cfg = DataConfig(dataset="folder", source=str(tmp_path / "imgs"), val_fraction=0.2)
    manifest = prepare(cfg, tmp_path / "out", raw_dir=tmp_path / "imgs")
    assert manifest["classes"] == ["cats", "dogs"]
    assert manifest["image_shape"] == [1, 8, 8]
    assert sum(s["count"] for s in manifest["splits"].values()) == 20


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d.mkdir(), "the image folder is empty"),
        (lambda d: (_png(d / "a.png"), (d / "notes.txt").write_text("hi")), "not an image file"),
        (
            lambda d: [_png(d / f"{i}.png") for i in range(3)] + [_png(d / "b.png", (9, 9))],
            r"b\.png: image shape \(1, 9, 9\) \(C, H, W\) differs from \(1, 8, 8\) of 3",
        ),
        (
            lambda d: (_png(d / "a.png"), (d / "b.png").write_bytes(b"junk")),
            r"b\.png: not a readable",
        ),
        (lambda d: (_png(d / "a.png"), _truncated_png(d / "t.png")), r"t\.png: cannot read"),
    ],
)
def test_bad_image_folders(tmp_path: Path, setup, message: str) -> None:
    setup(tmp_path / "imgs")
    with pytest.raises(DataError, match=message):
        check_source("folder", tmp_path / "imgs")


def _truncated_png(path: Path) -> None:
    noise = torch.randint(0, 256, (8, 8), generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.to(torch.uint8).numpy()).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut mid-IDAT


def test_changed_raw_files_warn_or_refuse(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = write_idx_dataset(tmp_path / "raw", n_train=60, n_test=20)
    out = tmp_path / "out"
    first = prepare(DataConfig(), out, raw_dir=tmp_path / "raw")
    write_idx_dataset(raw, n_train=61, n_test=20)  # the user's copy changed
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match="train-images-idx3-ubyte, train-labels-idx1-ubyte"):
        prepare(DataConfig(), out, raw_dir=tmp_path / "raw", strict=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "refusal changes nothing"
    with caplog.at_level("WARNING"):
        second = prepare(DataConfig(), out, raw_dir=tmp_path / "raw")
    assert "raw files differ" in caplog.text
    assert second["dataset_sha256"] != first["dataset_sha256"]


def _noise_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = torch.randint(0, 256, (8, 8), generator=torch.Generator().manual_seed(seed))
    Image.fromarray(noise.to(torch.uint8).numpy()).save(path)


def _split_of_each_image(out: Path) -> dict[bytes, str]:
    return {
        image.numpy().tobytes(): name
        for name in ("train", "val", "test")
        for image in load_split(out / f"{name}.pt").images
    }


def test_folder_splits_stay_put_as_the_folder_grows(tmp_path: Path) -> None:
    """An image's split depends on its content alone: new images never move old ones (so a
    champion is never re-scored on images it was trained on), and duplicates share a split."""
    for i in range(80):
        _noise_png(tmp_path / "imgs" / ("a", "b")[i % 2] / f"{i}.png", seed=i)
    cfg = DataConfig(dataset="folder", val_fraction=0.2)
    first = prepare(cfg, tmp_path / "one", raw_dir=tmp_path / "imgs")
    for i in range(80, 200):
        _noise_png(tmp_path / "imgs" / ("a", "b")[i % 2] / f"{i}.png", seed=i)
    _noise_png(tmp_path / "imgs" / "b" / "copy-of-3.png", seed=3)  # a duplicate
    second = prepare(cfg, tmp_path / "two", raw_dir=tmp_path / "imgs")
    before, after = (_split_of_each_image(tmp_path / d) for d in ("one", "two"))
    assert all(after[image] == split for image, split in before.items())
    counts = {k: v["count"] for k, v in second["splits"].items()}
    assert sum(counts.values()) == 201 and 20 <= counts["test"] <= 60, counts
    assert sum(s["count"] for s in first["splits"].values()) == 80
    with pytest.raises(
        DataError, match=r"data\.val_fraction: 0\.0001 leaves no val images among 201"
    ):
        prepare(
            DataConfig(dataset="folder", val_fraction=0.0001), tmp_path / "x", tmp_path / "imgs"
        )
