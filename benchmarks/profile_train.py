"""Where a training epoch's time goes: ``torch.profiler`` over the real training loop
(``vae.training.train.train``).

Run it from the project root, after ``vae prepare`` has written ``data/prepared/``::

    python benchmarks/profile_train.py                      # default params, on the CPU
    python benchmarks/profile_train.py -S train.batch_size=128 -S train.lr_decay=0
    python benchmarks/profile_train.py -S train.precision=bf16 --device cuda

It trains ``--epochs`` epochs (default 2) of the params in ``params.yaml`` (with the ``-S``
overrides, MLflow off) and profiles the last one only, so start-up and the first epoch's
warm-up are left out. It prints the operators that took the most self time, then one line that
splits the epoch into matrix products, the Adam step and everything else, per optimiser step,
and one line on the trained model's health: how many of Adam's first moments have decayed below
the smallest normal float (subnormal, where x86 arithmetic is slow, or flushed to 0) and how
many encoder units fire for no training image.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import yaml
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
ADAM_OPS = ("aten::_fused_adam_", "Optimizer.step#Adam.step")


def _override(params: dict[str, Any], assignment: str) -> None:
    key, _, value = assignment.partition("=")
    section, _, name = key.partition(".")
    if not name:
        raise SystemExit(f"-S {assignment}: expected section.key=value")
    params.setdefault(section, {})[name] = yaml.safe_load(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--epochs", type=int, default=2, help="epochs to train; the last is profiled")
    p.add_argument("--device", default=None, help="overrides train.device")
    p.add_argument("--data", default=str(ROOT / "data" / "prepared"))
    p.add_argument("--rows", type=int, default=20, help="operators to list")
    args = p.parse_args()

    from vae.data.splits import load_split
    from vae.params import parse_params
    from vae.training.distributed import select_device
    from vae.training.train import train

    if not (Path(args.data) / "manifest.json").exists():
        p.error(f"--data {args.data}: no prepared data; run `dvc repro prepare` first")
    params = yaml.safe_load(Path(args.params).read_text()) or {}
    for assignment in args.overrides:
        _override(params, assignment)
    params.setdefault("train", {})["epochs"] = args.epochs
    params.setdefault("mlflow", {})["enabled"] = False
    if args.device:
        params["train"]["device"] = args.device
    cfg = parse_params(params)
    device = select_device(cfg.train.device)
    train_split = load_split(Path(args.data) / "train.pt", device)
    val_split = load_split(Path(args.data) / "val.pt", device)

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    prof = profile(activities=activities)
    epochs_done = {"n": 0}

    def on_epoch_end(row: dict[str, float]) -> None:
        epochs_done["n"] += 1
        print(
            f"epoch {int(row['epoch'])}: {row['seconds']:.2f} s, val -ELBO {row['val_nelbo']:.2f}"
        )
        if epochs_done["n"] == args.epochs - 1:
            prof.start()  # profile the last epoch only

    with tempfile.TemporaryDirectory() as out:
        if args.epochs == 1:
            prof.start()
        result = train(
            cfg, train_split, val_split, Path(out), resume=False, on_epoch_end=on_epoch_end
        )
        prof.stop()
        health = _model_health(Path(out) / "checkpoint.pt", train_split)

    steps = result.history[-1]["step"] - (result.history[-2]["step"] if args.epochs > 1 else 0)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows))
    self_us = {e.key: e.self_cpu_time_total for e in events}
    total = sum(self_us.values())
    gemm = sum(v for k, v in self_us.items() if k in GEMM_OPS)
    adam = sum(v for k, v in self_us.items() if k in ADAM_OPS)
    rest = total - gemm - adam
    ms = lambda us: f"{us / steps / 1e3:.2f} ms ({us / total:.0%})"  # noqa: E731
    print(
        f"{steps} steps, batch {cfg.train.batch_size}, {device}: per step "
        f"{total / steps / 1e3:.2f} ms of CPU self time = GEMM {ms(gemm)} + Adam {ms(adam)} "
        f"+ the rest {ms(rest)}"
    )
    print(health)


def _model_health(checkpoint: Path, train_split: Any) -> str:
    """Subnormal Adam moments (slow on x86) and encoder units that fire for no image."""
    import torch

    from vae.config import ModelConfig
    from vae.core.model import VAE
    from vae.data.splits import batch_to_float
    from vae.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    tiny = torch.finfo(torch.float32).tiny
    moments = [
        t for st in ckpt["optimizer"]["state"].values() for k, t in st.items() if k == "exp_avg"
    ]
    # below the smallest normal float: subnormal, or 0 where training flushed subnormals
    vanished = sum(int((t.abs() < tiny).sum()) for t in moments)
    total = sum(t.numel() for t in moments)
    line = (
        f"after {ckpt['epoch']} epochs: {vanished:,} of {total:,} Adam first moments below "
        f"{tiny:.1e} (weights with no gradient)"
    )
    model_cfg = ModelConfig.from_saved(ckpt["params"]["model"])
    if model_cfg.arch != "mlp":
        return line
    model = VAE(model_cfg, tuple(ckpt["image_shape"]))
    model.load_state_dict(ckpt["model"])
    x = batch_to_float(train_split.images[:5000].cpu(), "none").flatten(1)
    with torch.no_grad():  # the encoder's hidden layer, before its activation
        pre = model.encoder.net[1](x)
    dead = int((pre.max(0).values <= 0).sum())
    return (
        f"{line}; encoder units positive for none of {x.shape[0]} training images: "
        f"{dead} of {pre.shape[1]}"
    )


if __name__ == "__main__":
    main()
