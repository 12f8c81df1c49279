from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vae.training.checkpoint
import vae.training.train
from tests.conftest import mlp_config, write_params
from tests.training.conftest import prepared_splits, train_cfg
from vae.cli import main
from vae.config import ConfigError
from vae.core.losses import LossTerms
from vae.params import load_params, parse_params
from vae.training.callbacks import image_grid
from vae.training.checkpoint import CheckpointError, load_checkpoint, load_model
from vae.training.tracking import NullTracker
from vae.training.train import NonFiniteLossError, lr_at, train


def test_cli_prepare_and_train_end_to_end(prepared: Path) -> None:
    assert main(["-q", "train"]) == 0
    metrics = json.loads(Path("metrics/train.json").read_text())
    assert metrics["epochs"] == 2 and metrics["best_epoch"] in (1, 2)
    assert metrics["best_val_nelbo"] > 0 and metrics["device"] == "cpu"
    rows = list(csv.DictReader(Path("plots/train.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "val_loss", "val_recon", "val_kl", "train_kl"} <= set(rows[0])
    model, meta = load_model("models/model.pt", expected=load_params().model)
    assert meta["epoch"] == metrics["best_epoch"]
    assert isinstance(model.encode(torch.rand(2, 1, 28, 28)).mean, torch.Tensor)


def test_training_lowers_the_loss(prepared: Path) -> None:
    result = train(train_cfg(epochs=4), *prepared_splits(prepared), out_dir=Path("models"))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.history[-1]["val_nelbo"] < result.history[0]["val_nelbo"]


def test_checkpoint_round_trips_every_tensor(prepared: Path) -> None:
    result = train(train_cfg(epochs=1), *prepared_splits(prepared), out_dir=Path("models"))
    ckpt = load_checkpoint("models/checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["step"] == result.history[-1]["step"]
    assert ckpt["versions"]["torch"] == torch.__version__
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(ckpt["best_model"][name], tensor), name
    model, _ = load_model("models/model.pt")
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


class _Killed(Exception):
    pass


def _kill_after(epoch: int):
    def on_epoch_end(row: dict[str, float]) -> None:
        if row["epoch"] == epoch:
            raise _Killed  # after the epoch's checkpoint is written, as a SIGKILL there would

    return on_epoch_end


@pytest.mark.parametrize(
    "extra",
    [
        {"lr_decay": 0.0},
        {"lr_decay": 0.5},
        {"lr_decay": 0.5, "objective": "iwae", "iw_k": 3, "ema_decay": 0.9},
    ],
    ids=["constant", "decay", "iwae-ema"],
)
def test_resume_matches_uninterrupted_run(prepared: Path, tmp_path: Path, extra: dict) -> None:
    splits, cfg = prepared_splits(prepared), train_cfg(epochs=3, **extra)
    lr_decay = cfg.train.lr_decay
    full = train(cfg, *splits, out_dir=tmp_path / "full")
    with pytest.raises(_Killed):
        train(cfg, *splits, out_dir=tmp_path / "cut", on_epoch_end=_kill_after(1))
    resumed = train(cfg, *splits, out_dir=tmp_path / "cut")
    assert resumed.resumed_from == 1
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(resumed.history) == drop(full.history)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(b["model"][name], tensor), name
    # each row records the lr of the epoch's last step, as vae.training.train.lr_at lays it out
    total = full.history[-1]["step"]
    expected = [lr_at(r["step"] - 1, total, cfg.train.lr, lr_decay) for r in full.history]
    assert [r["lr"] for r in full.history] == pytest.approx(expected)
    assert (full.history[-1]["lr"] < 0.1 * cfg.train.lr) == (lr_decay > 0)


def test_more_epochs_continue_a_constant_lr_run_only(prepared: Path, tmp_path: Path) -> None:
    splits = prepared_splits(prepared)
    train(train_cfg(epochs=1, lr_decay=0.0), *splits, out_dir=tmp_path / "constant")
    grown = train(train_cfg(epochs=2, lr_decay=0.0), *splits, out_dir=tmp_path / "constant")
    assert grown.resumed_from == 1 and len(grown.history) == 2
    # a decaying lr is laid out over `epochs`: epoch 1 of a 1-epoch run ended at lr 0
    train(train_cfg(epochs=1, lr_decay=0.5), *splits, out_dir=tmp_path / "decay")
    fresh = train(train_cfg(epochs=2, lr_decay=0.5), *splits, out_dir=tmp_path / "decay")
    assert fresh.resumed_from == 0


def test_training_flushes_subnormals_and_restores_them(prepared: Path) -> None:
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals (set_flush_denormal returned False)")
    torch.set_flush_denormal(False)
    tiny = torch.tensor([1e-40])  # a float32 subnormal
    seen: list[float] = []
    train(
        train_cfg(epochs=1),
        *prepared_splits(prepared),
        out_dir=Path("models"),
        on_epoch_end=lambda row: seen.append((tiny * 1.0).item()),
    )
    assert seen == [0.0]  # flushed while training (Adam's decaying moments are slow otherwise)
    assert (tiny * 1.0).item() > 0  # the process's default is back


def test_changed_params_start_from_scratch(prepared: Path, tmp_path: Path) -> None:
    splits = prepared_splits(prepared)
    train(train_cfg(epochs=1), *splits, out_dir=tmp_path)
    result = train(train_cfg(epochs=2, lr=0.001), *splits, out_dir=tmp_path)
    assert result.resumed_from == 0


def test_nan_loss_names_the_step_and_keeps_checkpoint(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    splits = prepared_splits(prepared)
    train(train_cfg(epochs=1, lr_decay=0.0), *splits, out_dir=Path("models"))
    good = load_checkpoint("models/checkpoint.pt")
    real = vae.training.train.objective_terms
    calls = {"n": 0}

    def poisoned(*args, **kwargs) -> LossTerms:
        terms = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            return terms._replace(loss=terms.loss * float("nan"))
        return terms

    monkeypatch.setattr(vae.training.train, "objective_terms", poisoned)
    step0 = good["step"]
    with pytest.raises(NonFiniteLossError, match=rf"at step {step0 + 2} \(epoch 2\)"):
        train(train_cfg(epochs=2, lr_decay=0.0), *splits, out_dir=Path("models"))
    kept = load_checkpoint("models/checkpoint.pt")
    assert kept["epoch"] == 1
    for name, tensor in good["model"].items():
        assert torch.equal(kept["model"][name], tensor)


def test_batch_larger_than_data_is_a_config_error(prepared: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        train(train_cfg(batch_size=100_000), *prepared_splits(prepared), out_dir=Path("models"))
    write_params(Path("params.yaml"), train={"batch_size": 100_000})
    assert main(["-q", "train"]) == 2
    assert not Path("models/checkpoint.pt").exists()


def test_corrupt_checkpoint_is_a_clear_error(prepared: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["-q", "train"]) == 0
    blob = Path("models/checkpoint.pt").read_bytes()
    Path("models/checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    assert main(["-q", "train"]) == 1
    assert "corrupt or truncated checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="trained with other params"):
        load_model("models/model.pt", expected=mlp_config(latent_dim=5, hidden_dim=32))


def test_changed_training_code_starts_from_scratch(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    splits = prepared_splits(prepared)
    train(train_cfg(epochs=1), *splits, out_dir=tmp_path)
    monkeypatch.setattr(vae.training.checkpoint, "code_fingerprint", lambda: "other code")
    result = train(train_cfg(epochs=2), *splits, out_dir=tmp_path)
    assert result.resumed_from == 0


@pytest.mark.slow
def test_compiled_training_matches_eager(prepared: Path, tmp_path: Path) -> None:
    splits = prepared_splits(prepared)
    eager = train(train_cfg(epochs=1), *splits, out_dir=tmp_path / "eager")
    compiled = train(train_cfg(epochs=1, compile=True), *splits, out_dir=tmp_path / "compiled")
    for key in ("train_loss", "val_nelbo", "val_kl"):  # inductor fuses ops: not bit-identical
        assert compiled.history[0][key] == pytest.approx(eager.history[0][key], rel=1e-3), key


def test_a_model_saved_before_activation_existed_loads_as_relu(prepared: Path) -> None:
    train(train_cfg(epochs=1), *prepared_splits(prepared), out_dir=Path("models"))
    obj = torch.load("models/model.pt", weights_only=True)
    assert obj["params"]["model"].pop("activation") == "leaky_relu"  # as an older vae saved it
    torch.save(obj, "models/old.pt")
    model, _ = load_model("models/old.pt")
    assert model.cfg.activation == "relu"  # what every model was trained with back then
    assert isinstance(model.encoder.net[2], torch.nn.ReLU)


def test_the_code_fingerprint_ignores_comments_and_docstrings() -> None:
    """A comment or docstring edit must resume; a change of behaviour must retrain."""
    from vae.training.checkpoint import behaviour

    source = (Path(vae.training.train.__file__)).read_text()
    edited = source.replace('"""The training loop', '"""The training loop, reworded', 1)
    edited = edited.replace("\n\n\ndef lr_at(", "\n\n\n# a new comment\ndef lr_at(", 1)
    assert edited != source and behaviour(edited) == behaviour(source)
    changed = source.replace("return lr * 0.5 *", "return lr * 0.25 *", 1)
    assert changed != source and behaviour(changed) != behaviour(source)


def test_iwae_objective_trains_on_the_tighter_bound(prepared: Path, tmp_path: Path) -> None:
    splits = prepared_splits(prepared)
    result = train(train_cfg(epochs=2, objective="iwae", iw_k=4), *splits, out_dir=tmp_path)
    for row in result.history:
        # -L_K <= the Monte Carlo -ELBO of the same samples (Jensen), on train and validation
        assert row["train_loss"] <= -row["train_elbo"] and row["val_loss"] <= row["val_nelbo"]
    assert result.metrics["best_val_loss"] == min(r["val_loss"] for r in result.history)


def test_ema_weights_are_the_ones_kept(prepared: Path, tmp_path: Path) -> None:
    """With an EMA, validation, the best epoch and model.pt all use the averaged weights."""
    splits = prepared_splits(prepared)
    seen: list[dict[str, torch.Tensor]] = []

    class Spy(vae.training.train.EMA):
        def update(self, model: torch.nn.Module, step: int) -> None:
            super().update(model, step)
            seen.append({k: v.clone() for k, v in self.model.state_dict().items()})

    vae.training.train.EMA, real = Spy, vae.training.train.EMA
    try:
        result = train(train_cfg(epochs=2, ema_decay=0.99, lr_decay=0.0), *splits, out_dir=tmp_path)
    finally:
        vae.training.train.EMA = real
    best = result.history[result.metrics["best_epoch"] - 1]["step"]
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    for name, tensor in seen[best - 1].items():
        assert torch.equal(saved[name], tensor), name
    raw = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    assert any(not torch.equal(raw[k], saved[k]) for k in saved), "EMA equals the raw weights"


class RecordingTracker(NullTracker):
    def __init__(self) -> None:
        self.images: list[tuple[str, np.ndarray, int]] = []
        self.metrics: list[tuple[dict[str, float], int | None]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((metrics, step))

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        self.images.append((key, image, step))


def _with_images(every: int, epochs: int):
    base = load_params("params.yaml").to_dict()
    base["train"].update(epochs=epochs)
    base["mlflow"].update(image_every=every)
    return parse_params(base)


def test_epoch_images_go_to_the_tracker_at_their_epochs(prepared: Path, tmp_path: Path) -> None:
    """At step 0, every image_every epochs and at the last: two grids, the same draws each time,
    and the training itself unchanged by them (the draws use their own generator)."""
    tracker = RecordingTracker()
    with_images = train(
        _with_images(2, 3), *prepared_splits(prepared), tmp_path / "a", tracker=tracker
    )
    steps = [(key, step) for key, _, step in tracker.images]
    assert steps == [(k, step) for step in (0, 2, 3) for k in ("samples", "reconstructions")]
    for key, image, _ in tracker.images:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, key
        assert image.std() > 0, f"{key} is blank"
    samples, recon = tracker.images[2][1], tracker.images[3][1]
    assert samples.shape == (2 * (2 + 2 * 30), 2 * (2 + 8 * 30), 3)  # 16 draws, 8 a row, 2x
    assert recon.shape == samples.shape  # 8 inputs over their 8 reconstructions
    assert any("epoch_images_seconds" in m for m, _ in tracker.metrics)
    without = train(
        _with_images(0, 3), *prepared_splits(prepared), tmp_path / "b", tracker=NullTracker()
    )
    for name, tensor in with_images.model.state_dict().items():
        assert torch.equal(tensor, without.model.state_dict()[name]), name
    again = RecordingTracker()
    train(_with_images(2, 3), *prepared_splits(prepared), tmp_path / "c", tracker=again)
    assert np.array_equal(again.images[2][1], samples), "the same draws, the same grid"
    assert not np.array_equal(tracker.images[0][1], samples), "step 0 is the untrained model"


def test_image_grid_lays_images_out_in_rows() -> None:
    images = torch.zeros(3, 1, 2, 2)
    images[1] = 1.0
    grid = image_grid(images, nrow=2, padding=1)
    assert grid.shape == (1 + 2 * 3, 1 + 2 * 3, 3)
    assert (grid[1:3, 4:6] == 255).all() and grid[1:3, 1:3].max() == 0
    assert grid.sum() == 4 * 3 * 255
    big = image_grid(images, nrow=2, padding=1, scale=3)
    assert big.shape == (21, 21, 3) and (big[::3, ::3] == grid).all()
