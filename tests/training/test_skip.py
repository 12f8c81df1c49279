"""train.skip_grad_norm: a batch whose gradient norm is above it leaves the weights, Adam's state
and the EMA as they were; below every norm it changes nothing; above every norm it stops."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

import vae.training.train
from tests.training.conftest import prepared_splits, train_cfg
from vae.config import Config
from vae.core.losses import LossTerms
from vae.data.splits import Split, batch_to_float
from vae.training.train import SkippedEveryStepError, _setup, _step, draw_eps, train


@pytest.fixture
def splits(prepared: Path) -> tuple[Split, Split]:
    return prepared_splits(prepared)


def _cfg(**train_params: object) -> Config:
    return train_cfg(**{"ema_decay": 0.9, **train_params})


def _scaled_loss(monkeypatch: pytest.MonkeyPatch, factor: float, calls: set[int]) -> None:
    real, seen = vae.training.train.objective_terms, {"n": 0}

    def scaled(*args, **kwargs) -> LossTerms:
        terms = real(*args, **kwargs)
        seen["n"] += 1
        return terms._replace(loss=terms.loss * factor) if seen["n"] in calls else terms

    monkeypatch.setattr(vae.training.train, "objective_terms", scaled)


def _state(run) -> list[torch.Tensor]:
    opt = [t for s in run.opt.state.values() for t in s.values() if torch.is_tensor(t)]
    params = [p.detach() for p in run.model.parameters()]
    return [t.clone() for t in params + opt + list(run.ema.model.parameters())]


@pytest.mark.parametrize("factor", [1e6, float("nan")])
def test_a_batch_above_the_norm_leaves_weights_adam_and_ema_alone(
    splits, monkeypatch: pytest.MonkeyPatch, factor: float
) -> None:
    cfg = _cfg(skip_grad_norm=1000.0, grad_clip=200.0)
    run = _setup(cfg, *splits)
    x = batch_to_float(splits[0].images[:16], "static")
    eps = draw_eps((16, cfg.model.code_dim), "elbo", 1, run.noise_gen, torch.device("cpu"))
    _step(run, x, eps, 100)  # a normal step first: Adam's moments exist
    before = _state(run)
    _scaled_loss(monkeypatch, factor, calls={1})
    _step(run, x, eps, 100)
    assert run.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, _state(run), strict=True))
    _step(run, x, eps, 100)  # the next ordinary batch steps again
    assert run.skipped == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, _state(run), strict=True))


def test_a_skip_above_every_norm_changes_nothing(splits) -> None:
    runs = [
        train(_cfg(epochs=2, skip_grad_norm=s), *splits, out_dir=Path(f"m{s}")) for s in (0, 1e9)
    ]
    for a, b in zip(*(r.model.state_dict().values() for r in runs), strict=True):
        assert torch.equal(a, b)
    assert [r["val_loss"] for r in runs[0].history] == [r["val_loss"] for r in runs[1].history]
    assert [r["skipped_steps"] for r in runs[1].history] == [0, 0]


@pytest.mark.parametrize("factor", [1e6, float("nan")])
def test_skipped_steps_are_counted_logged_and_left_out_of_the_means(
    splits, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, factor: float
) -> None:
    """A skipped batch's loss, huge or NaN, is in no mean of the epoch's row, and a NaN there
    does not stop the run: its step was never taken. The row is the mean of the steps taken."""
    clean = train(_cfg(epochs=1, skip_grad_norm=1000.0), *splits, out_dir=Path("clean"))
    _scaled_loss(monkeypatch, factor, calls={2})
    with caplog.at_level(logging.WARNING, logger="vae.training.train"):
        result = train(_cfg(epochs=1, skip_grad_norm=1000.0), *splits, out_dir=Path("models"))
    row, ref = result.history[0], clean.history[0]
    assert row["skipped_steps"] == 1 and ref["skipped_steps"] == 0
    assert "epoch 1: skipped 1 of" in caplog.text and "train.skip_grad_norm=1000" in caplog.text
    assert math.isfinite(row["train_loss"]) and abs(row["train_loss"] - ref["train_loss"]) < 50
    assert Path("models/model.pt").exists()


def test_a_norm_below_every_gradient_stops_naming_the_key(splits) -> None:
    with pytest.raises(
        SkippedEveryStepError, match=r"^train\.skip_grad_norm: every step of epoch 1"
    ):
        train(_cfg(epochs=1, skip_grad_norm=1e-9), *splits, out_dir=Path("models"))
    assert not Path("models/model.pt").exists()
