"""The training loop's side effects, as callbacks: checkpoints, tracking, the log line, the bar.

:func:`vae.training.train.train` calls ``on_epoch_start``, ``on_step`` and ``on_epoch_end`` on each
of :func:`standard_callbacks` and does nothing else but step and validate (minGPT's ``Trainer``
keeps printing and checkpointing out of its loop the same way). Only rank 0 writes, so the list
is empty on the other ranks of a DDP run: the rank check is made once, here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vae.training.checkpoint import save_checkpoint
from vae.training.tracking import Tracker

if TYPE_CHECKING:
    from vae.training.run import Run

__all__ = ["Callback", "standard_callbacks"]

log = logging.getLogger("vae.training.train")


class Callback:
    """Does nothing; a callback overrides what it needs."""

    def on_epoch_start(self, run: Run) -> None:
        pass

    def on_step(self, run: Run) -> None:
        pass

    def on_epoch_end(self, run: Run, row: dict[str, float]) -> None:
        pass


class CheckpointWriter(Callback):
    """After every epoch, the atomic, self-describing checkpoint a resumed run starts from."""

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path, self.identity = path, identity

    def on_epoch_end(self, run: Run, row: dict[str, float]) -> None:
        save_checkpoint(
            self.path,
            self.identity,
            model=run.model.state_dict(),
            optimizer=run.opt.state_dict(),
            image_shape=list(run.model.image_shape),
            epoch=run.epoch,
            step=run.step,
            history=run.history,
            best_val_loss=run.best_loss,  # the key checkpoints have always used
            best_epoch=run.best_epoch,
            best_model=run.best_state,
            rng={"shuffle": run.shuffle_gen.get_state(), "noise": run.noise_gen.get_state().cpu()},
            ema=None if run.ema is None else run.ema.model.state_dict(),
        )


class TrackerLog(Callback):
    """The epoch's row to the tracker (MLflow), with the epoch as its step."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_epoch_end(self, run: Run, row: dict[str, float]) -> None:
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=run.epoch)


class LogLine(Callback):
    def on_epoch_end(self, run: Run, row: dict[str, float]) -> None:
        log.info(
            "epoch %d/%d  train -elbo %.2f  val -elbo %.2f (recon %.2f, kl %.2f)  "
            "%.1fs (%.0f img/s)",
            run.epoch,
            run.cfg.train.epochs,
            -row["train_elbo"],
            row["val_nelbo"],
            row["val_recon"],
            row["val_kl"],
            row["seconds"],
            run.n / row["seconds"],
        )


class ProgressBar(Callback):
    """A bar over the epoch's steps, on a terminal only."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_epoch_start(self, run: Run) -> None:
        from tqdm import tqdm

        desc = f"epoch {run.epoch + 1}/{run.cfg.train.epochs}"
        self.bar = tqdm(total=run.n_batches, desc=desc, leave=False, dynamic_ncols=True)

    def on_step(self, run: Run) -> None:
        self.bar.update(1)

    def on_epoch_end(self, run: Run, row: dict[str, float]) -> None:
        self.bar.close()


class EpochHook(Callback):
    """A plain function of the epoch's row (``train(on_epoch_end=...)``)."""

    def __init__(self, fn: Callable[[dict[str, float]], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, run: Run, row: dict[str, float]) -> None:
        self.fn(row)


def standard_callbacks(
    run: Run,
    ckpt_path: Path,
    identity: dict[str, Any],
    tracker: Tracker | None,
    on_epoch_end: Callable[[dict[str, float]], None] | None,
) -> list[Callback]:
    """What rank 0 does after each step and epoch; nothing on the other ranks."""
    if run.rank != 0:
        return []
    callbacks: list[Callback] = [ProgressBar()] if sys.stderr.isatty() else []
    callbacks.append(CheckpointWriter(ckpt_path, identity))
    if tracker is not None:
        callbacks.append(TrackerLog(tracker))
    callbacks.append(LogLine())
    if on_epoch_end is not None:
        callbacks.append(EpochHook(on_epoch_end))
    return callbacks
