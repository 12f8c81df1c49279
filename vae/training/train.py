"""The training loop: explicit, seeded, resumable.

The whole prepared dataset sits on the training device as uint8 (47 MB for Fashion-MNIST) and
batches are drawn by indexing it, so there is no per-image Python and no DataLoader. Per-step
statistics are accumulated on the device and read once per epoch (one host-device sync).

After every epoch an atomic, self-describing checkpoint is written. ``train`` resumes from it
when its params match (only ``train.epochs`` may grow), and because every random number comes
from generators whose states the checkpoint holds, a resumed run ends with the same weights
and metrics as an uninterrupted one (on the CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vae.config import Config, ConfigError
from vae.core.losses import LossTerms, kl_weight, objective_terms
from vae.core.model import VAE, eval_mode
from vae.data.splits import Split, batch_to_float, float_images
from vae.errors import PermanentError
from vae.training.checkpoint import load_checkpoint, run_identity, save_model, why_not_resume
from vae.training.distributed import from_writer, rank_and_world
from vae.training.ema import EMA
from vae.training.numerics import autocast_for, flush_denormals
from vae.training.run import Run, TrainResult
from vae.training.tracking import Tracker

__all__ = ["NonFiniteLossError", "SkippedEveryStepError", "lr_at", "train"]

log = logging.getLogger(__name__)
TERMS = ("loss", "elbo", "recon", "kl")


class NonFiniteLossError(PermanentError, RuntimeError):
    """The loss became NaN or inf; the message names the first bad step."""


class SkippedEveryStepError(PermanentError, RuntimeError):
    """``train.skip_grad_norm`` skipped every step of an epoch: it is below every norm."""


def lr_at(step: int, total_steps: int, lr: float, decay: float) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of a ``total_steps`` run.

    Constant ``lr`` for the first ``1 - decay`` of the steps, then a half-cosine down to 0 over
    the last ``decay`` of them (``decay=1`` is the cosine schedule of Loshchilov & Hutter 2017,
    without restarts; ``decay=0`` is a constant lr).
    """
    tail = decay * total_steps
    into = step - (total_steps - tail)
    if tail <= 0 or into <= 0:
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(into / tail, 1.0)))


def draw_eps(
    shape: tuple[int, int], objective: str, k: int, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """The reparameterisation noise of a batch: (B, D), or (K, B, D) for the iwae objective."""
    full = (k, *shape) if objective == "iwae" else shape
    return torch.randn(full, generator=gen, device=device)


@torch.no_grad()
def evaluate_elbo(
    model: VAE,
    x_all: torch.Tensor,
    seed: int,
    batch_size: int = 1000,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
    objective: str = "elbo",
    k: int = 1,
) -> LossTerms:
    """Mean terms of ``objective`` over pre-binarized float images, with a fixed seed.

    For the ELBO, ``loss`` is the single-sample -ELBO; for iwae, -L_K with K = ``k``.
    """
    with eval_mode(model):
        gen = torch.Generator(device=x_all.device).manual_seed(seed)
        sums = torch.zeros(4, device=x_all.device)
        for i in range(0, x_all.shape[0], batch_size):
            x = x_all[i : i + batch_size]
            eps = draw_eps((x.shape[0], model.code_dim), objective, k, gen, x.device)
            with autocast or contextlib.nullcontext():
                terms = objective_terms(x, model(x, eps=eps), objective)
            sums += torch.stack(terms).detach().float() * x.shape[0]
    return LossTerms(*(sums / x_all.shape[0]))


def train(
    cfg: Config,
    train_split: Split,
    val_split: Split,
    out_dir: Path = Path("models"),
    tracker: Tracker | None = None,
    resume: bool = True,
    dataset_sha256: str = "",
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train on ``train_split`` (already on the device); keep the best epoch on ``val_split``.

    Resumes from ``out_dir/checkpoint.pt`` when ``resume`` and its params match; reports each
    epoch's row to ``tracker`` and ``on_epoch_end``; writes ``out_dir/model.pt`` (best epoch).
    The loop itself only steps and validates; checkpoints, tracking, the log line and the
    progress bar are callbacks (:mod:`vae.training.callbacks`), chosen once, on rank 0 only.
    """
    from vae.training.callbacks import standard_callbacks

    with flush_denormals(train_split.images.device):
        run = _setup(cfg, train_split, val_split)
        identity = run_identity(cfg, dataset_sha256)  # once: it hashes the training code
        ckpt_path = out_dir / "checkpoint.pt"
        resumed_from = _resume(run, ckpt_path, identity) if resume else 0
        callbacks = standard_callbacks(run, ckpt_path, identity, tracker, on_epoch_end)
        while run.epoch < cfg.train.epochs:
            for cb in callbacks:
                cb.on_epoch_start(run)
            row = _run_epoch(run, train_split, callbacks, ckpt_path)
            for cb in callbacks:
                cb.on_epoch_end(run, row)
        return _finish(run, out_dir, dataset_sha256, resumed_from)


def _setup(cfg: Config, train_split: Split, val_split: Split) -> Run:
    """Check, seed and build: the model, the optimiser, the generators, DDP and compile."""
    tc = cfg.train
    rank, world = rank_and_world()
    device = train_split.images.device
    n = len(train_split)
    if tc.batch_size > n:
        raise ConfigError(
            f"train.batch_size: {tc.batch_size} is larger than the training split "
            f"({n} images); expected a value <= {n}"
        )
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(tc.seed)  # the weights' initialisation
    model = VAE(cfg.model, tuple(train_split.images.shape[1:])).to(device)
    # fused: one kernel for the whole update, faster and the same result (benchmarks/README.md)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, fused=device.type in ("cpu", "cuda"))
    shuffle_gen = torch.Generator().manual_seed(tc.seed)
    noise_gen = torch.Generator(device=device).manual_seed(tc.seed + 1)
    x_val = float_images(val_split, cfg.data.binarize, tc.seed + 2)
    net: torch.nn.Module = model
    if world > 1:  # gradients are all-reduced; every rank holds the same weights
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if tc.compile:
        # On one CUDA device, "reduce-overhead" also replays the compiled forward and backward as
        # CUDA graphs: a step of this small model is ~40 short kernels, so launches dominate.
        # Not under DDP, whose gradient hooks run between the graph's pieces.
        mode = "reduce-overhead" if device.type == "cuda" and world == 1 else None
        net = torch.compile(net, mode=mode)
    autocast = autocast_for(device, tc.precision)
    run = Run(cfg, model, net, opt, shuffle_gen, noise_gen, x_val, autocast, n, rank, world)
    run.ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
    return run


def _resume(run: Run, ckpt_path: Path, identity: dict[str, Any]) -> int:
    """Restore ``run`` from ``ckpt_path`` when it fits; returns the epochs it had completed."""
    # The writer's checkpoint, sent to every rank: a node of its own has none in its clone
    ckpt = load_checkpoint(ckpt_path) if run.rank == 0 and ckpt_path.exists() else None
    if run.world > 1:
        ckpt = from_writer(ckpt)
    if ckpt is None:
        return 0
    if reason := why_not_resume(ckpt, identity, run.cfg.train.epochs):
        if run.rank == 0:
            log.warning("not resuming %s: %s; starting from scratch", ckpt_path, reason)
        return 0
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.shuffle_gen.set_state(ckpt["rng"]["shuffle"])
    run.noise_gen.set_state(ckpt["rng"]["noise"].to(run.noise_gen.get_state().device))
    run.epoch, run.step, run.history = ckpt["epoch"], ckpt["step"], ckpt["history"]
    # "best_val_loss" on disk: the name checkpoints have always used for the best -ELBO
    run.best_loss, run.best_epoch = ckpt["best_val_loss"], ckpt["best_epoch"]
    run.best_state = ckpt["best_model"]
    if run.ema is not None:
        run.ema.model.load_state_dict(ckpt["ema"])
    if run.rank == 0:
        log.info("resuming from %s at epoch %d (step %d)", ckpt_path, run.epoch, run.step)
    return run.epoch


def _run_epoch(run: Run, split: Split, callbacks: list[Any], ckpt_path: Path) -> dict[str, float]:
    """One pass over the training split, then validation; returns the epoch's row."""
    cfg, tc = run.cfg, run.cfg.train
    device = split.images.device
    run.model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(run.n, generator=run.shuffle_gen).to(device, non_blocking=True)
    sums = torch.zeros(4, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    shard = slice(run.rank, None, run.world)  # this rank's rows of every global batch
    total_steps = run.n_batches * tc.epochs
    run.skipped, taken = 0, 0  # taken: the images of the steps taken; a mean is over them
    for i in range(run.n_batches):
        idx = perm[i * tc.batch_size : (i + 1) * tc.batch_size]  # the global batch (B,)
        # Noise is drawn for the whole global batch and sliced, so N ranks see exactly the
        # numbers one process would: DDP reproduces the single-process trajectory.
        shape = (idx.shape[0], *split.images.shape[1:])
        u = None
        if cfg.data.binarize == "dynamic":
            u = torch.rand(shape, generator=run.noise_gen, device=device)[shard]
        eps = draw_eps(
            (idx.shape[0], cfg.model.code_dim), tc.objective, tc.iw_k, run.noise_gen, device
        )
        x = batch_to_float(split.images[idx[shard]], cfg.data.binarize, uniform=u)
        # None: skipped (train.skip_grad_norm); its loss, NaN or not, counts in no mean
        if (stacked := _step(run, x, eps[..., shard, :], total_steps)) is not None:
            first_bad = torch.where(
                ~torch.isfinite(stacked).all() & (first_bad < 0), run.step, first_bad
            )
            sums, taken = sums + stacked * x.shape[0], taken + idx.shape[0]
        run.step += 1
        for cb in callbacks:
            cb.on_step(run)
    if run.world > 1:  # per-epoch totals over all ranks (one collective per epoch)
        import torch.distributed as dist

        dist.all_reduce(sums)
        dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
    if (bad_step := int(first_bad)) >= 0:  # the one sync per epoch
        raise NonFiniteLossError(
            f"the loss became NaN or inf at step {bad_step} (epoch {run.epoch + 1}); "
            f"kept the last good checkpoint {ckpt_path} (epoch {run.epoch}). "
            "Lower train.lr, set train.grad_clip, or check the data"
        )
    _check_skipped(run)
    val = evaluate_elbo(
        run.evaluated,
        run.x_val,
        tc.seed + 3,
        autocast=run.autocast,
        objective=tc.objective,
        k=tc.iw_k,
    )
    run.epoch += 1
    row = _epoch_row(run, (sums / taken).tolist(), val, time.perf_counter() - t0)
    run.history.append(row)
    # The best epoch is the one with the best validation objective: -ELBO, or -L_K for iwae.
    if row["val_loss"] < run.best_loss:
        run.best_loss, run.best_epoch = row["val_loss"], run.epoch
        state = run.evaluated.state_dict()
        run.best_state = {k: v.detach().cpu().clone() for k, v in state.items()}
    return row


def _check_skipped(run: Run) -> None:
    """Say how many steps ``train.skip_grad_norm`` skipped this epoch; stop if it was all."""
    if not run.skipped:
        return
    limit, epoch = run.cfg.train.skip_grad_norm, run.epoch + 1
    if run.skipped == run.n_batches:
        raise SkippedEveryStepError(
            f"train.skip_grad_norm: every step of epoch {epoch} had a gradient norm "
            f"above {limit:g}, so nothing trained; raise it, or set 0 to turn skipping off"
        )
    log.warning(
        "epoch %d: skipped %d of %d steps (gradient norm above train.skip_grad_norm=%g)",
        epoch,
        run.skipped,
        run.n_batches,
        limit,
    )


def _step(run: Run, x: torch.Tensor, eps: torch.Tensor, total_steps: int) -> torch.Tensor | None:
    """One optimiser step on batch ``x``: the detached (loss, elbo, recon, kl), None if skipped."""
    tc = run.cfg.train
    w = kl_weight(run.step, tc.kl_warmup_steps, tc.beta)
    if tc.lr_decay > 0:
        for group in run.opt.param_groups:
            group["lr"] = lr_at(run.step, total_steps, tc.lr, tc.lr_decay)
    with run.autocast:
        terms = objective_terms(x, run.net(x, eps=eps), tc.objective, w, tc.free_bits)
    run.opt.zero_grad(set_to_none=True)
    terms.loss.backward()
    if tc.grad_clip > 0 or tc.skip_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), tc.grad_clip or math.inf)
        # The one host sync per step, only when skipping is on; NaN compares False: skipped
        if tc.skip_grad_norm > 0 and not bool(norm <= tc.skip_grad_norm):
            run.skipped += 1
            return None  # no step: the weights, Adam's moments and the EMA stay as they were
    run.opt.step()
    if run.ema is not None:
        run.ema.update(run.model, run.step)
    return torch.stack(terms).detach().float()


def _epoch_row(run: Run, train_terms: list[float], val: LossTerms, seconds: float) -> dict:
    tc = run.cfg.train
    row = {
        "epoch": run.epoch,
        "step": run.step,
        "kl_weight": kl_weight(run.step, tc.kl_warmup_steps, tc.beta),
        "lr": run.opt.param_groups[0]["lr"],
    }
    row.update({f"train_{k}": v for k, v in zip(TERMS, train_terms, strict=True)})
    row["skipped_steps"] = run.skipped
    row.update({f"val_{k}": float(v) for k, v in zip(TERMS, val, strict=True)})
    row["val_nelbo"] = -row["val_elbo"]
    row["seconds"] = seconds
    return row


def _finish(run: Run, out_dir: Path, dataset_sha256: str, resumed_from: int) -> TrainResult:
    """Load the best epoch's weights, write ``model.pt`` (rank 0), summarise the run."""
    model, history = run.model, run.history
    model.load_state_dict(run.best_state)
    model.eval()
    best_nelbo = history[run.best_epoch - 1]["val_nelbo"]
    if run.rank == 0:
        summary = {"epoch": run.best_epoch, "val_nelbo": best_nelbo}
        save_model(
            out_dir / "model.pt", model, run.cfg.data, {**summary, "dataset_sha256": dataset_sha256}
        )
    last = history[-1]
    timed = [r["seconds"] for r in history[1:]] or [history[0]["seconds"]]
    per_epoch = sum(timed) / len(timed)
    metrics = {
        "best_epoch": run.best_epoch,
        "best_val_nelbo": best_nelbo,
        "best_val_loss": run.best_loss,  # the objective: -ELBO, or -L_K for iwae
        "final_train_nelbo": -last["train_elbo"],
        "final_val_nelbo": last["val_nelbo"],
        "final_val_recon": last["val_recon"],
        "final_val_kl": last["val_kl"],
        "epochs": last["epoch"],
        "steps": last["step"],
        "seconds_per_epoch": per_epoch,
        "train_images_per_second": run.n / per_epoch,
        "device": str(run.x_val.device),
        "world_size": run.world,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return TrainResult(model, history, metrics, resumed_from)
