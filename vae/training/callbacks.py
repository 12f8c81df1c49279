"""The training loop's side effects, as callbacks: checkpoints, tracking, the log line, the bar.

:func:`vae.training.train.train` calls ``on_epoch_start``, ``on_step`` and ``on_epoch_end`` on each
of :func:`standard_callbacks` and does nothing else but step and validate (minGPT's ``Trainer``
keeps printing and checkpointing out of its loop the same way). Only rank 0 writes, so the list
is empty on the other ranks of a DDP run: the rank check is made once, here.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vae.core.model import eval_mode
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


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2, scale: int = 1) -> Any:
    """(N, C, H, W) in [0, 1] -> one (H', W', 3) uint8 numpy array, ``nrow`` images a row, on a
    black ground: the layout of the PNG grids ``vae generate`` writes; each pixel ``scale`` x
    ``scale`` (the MLflow UI shows an image at its own size)."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    x = images.detach().float().clamp(0, 1).cpu()
    x = x.expand(n, 3, h, w) if c == 1 else x[:, :3]
    canvas = torch.zeros(3, rows * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        canvas[:, top : top + h, left : left + w] = x[i]
    canvas = canvas.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


class EpochImages(Callback):
    """Before the first epoch (step 0), every ``every`` epochs and at the last, two grids to the
    tracker at the epoch as their step, so the MLflow UI shows them change and compares runs:
    ``samples``, decoder means of the same prior draws each time (one seeded generator), and
    ``reconstructions``, fixed validation images (top row) over their decoder means. The loop
    waits only for the decoding: :meth:`vae.mlops.mlflow_tracker.MlflowTracker.log_image`
    uploads in the background."""

    def __init__(self, tracker: Tracker, every: int, n: int = 8, seed: int = 0) -> None:
        self.tracker, self.every, self.n, self.seed = tracker, every, n, seed
        self.seconds = 0.0  # the loop's time spent here, reported at the end of training
        self.grids = 0

    def on_epoch_start(self, run: Run) -> None:
        if run.epoch == 0:  # the untrained model at step 0, where the UI's slider starts
            self._log(run)

    def on_epoch_end(self, run: Run, row: dict[str, float]) -> None:
        if run.epoch % self.every and run.epoch != run.cfg.train.epochs:
            return
        self._log(run)

    def _log(self, run: Run) -> None:
        t0 = time.perf_counter()
        model = run.evaluated
        device = run.x_val.device
        x = run.x_val[: self.n]
        with torch.no_grad(), eval_mode(model):
            gen = torch.Generator(device).manual_seed(self.seed)
            samples = model.generate(2 * self.n, gen)
            recon = model.decode(model.encode(x).mean).mean
        grid = {"samples": samples, "reconstructions": torch.cat([x, recon])}
        for key, images in grid.items():
            self.tracker.log_image(key, image_grid(images, self.n, scale=2), run.epoch)
        self.seconds += time.perf_counter() - t0
        self.grids += 1
        if run.epoch == run.cfg.train.epochs:
            share = self.seconds / max(sum(r["seconds"] for r in run.history), 1e-9)
            self.tracker.log_metrics({"epoch_images_seconds": self.seconds}, step=run.epoch)
            log.info(
                "epoch images: %d pairs of grids, %.2f s in the loop (%.2f %% of the epochs' time)",
                self.grids,
                self.seconds,
                100 * share,
            )


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
        if every := run.cfg.mlflow.image_every:
            callbacks.append(EpochImages(tracker, every, seed=run.cfg.train.seed + 11))
    callbacks.append(LogLine())
    if on_epoch_end is not None:
        callbacks.append(EpochHook(on_epoch_end))
    return callbacks
