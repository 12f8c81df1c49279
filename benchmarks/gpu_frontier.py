"""The GPU check of the likelihood frontier, one prepared script for a lent GPU machine.

It needs torch and pyyaml alone (a GPU machine has its own PyTorch and no network), the
project's ``vae/`` and the prepared splits (``data/prepared``, 53 MB: carry them). In order:

1. ``benchmarks/throughput.py --device DEVICE --repeats 1`` (its own table; its row (d), the
   ``vae train`` CLI, needs MLflow and reports "failed" where MLflow is missing);
2. the ``conv-hvae`` preset of presets.yaml trained for a fixed ``--minutes`` (default 5): one
   epoch is timed first on a throw-away model, then the run is laid out over the epochs that fit
   (its lr schedule and KL warm-up fitted to them: the warm-up is capped at a quarter of the
   steps);
3. the importance-weighted -log p(x) at K = ``--iw-samples`` (5000) on the first ``--images``
   (1000) test images, binarized once on the CPU as ``vae evaluate`` does there.

It prints images per second and nats, and writes everything to ``--out`` (``$OUT`` on the
device machine)::

    python benchmarks/gpu_frontier.py --device cuda --out "$OUT"        # about 8 minutes
    python benchmarks/gpu_frontier.py --device cpu --minutes 0.2 --iw-samples 20 --images 20 \\
        --skip-throughput --train-images 512 --set model.conv_channels=4  # a smoke run here
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae.config import Config, EvaluateConfig  # noqa: E402
from vae.data.splits import Split, float_images, load_split  # noqa: E402
from vae.evaluation.evaluate import evaluate  # noqa: E402
from vae.params import parse_params  # noqa: E402
from vae.presets import apply_preset, load_presets  # noqa: E402
from vae.training.train import train  # noqa: E402


def preset_config(name: str, device: str, settings: list[str]) -> Config:
    """params.yaml with the preset, then ``settings`` (``section.key=value``), MLflow off."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = dict(load_presets(ROOT / "presets.yaml")[name])
    overrides.update((k, yaml.safe_load(v)) for k, v in (s.split("=", 1) for s in settings))
    raw = apply_preset(raw, {**overrides, "mlflow.enabled": False, "train.device": device})
    return parse_params(raw)


def _split(data: Path, name: str, device: str, limit: int) -> Split:
    split = load_split(data / f"{name}.pt")
    if limit:
        split = Split(split.images[:limit], split.labels[:limit])
    return Split(split.images.to(device), split.labels.to(device))


def train_for(cfg: Config, data: Path, minutes: float, out: Path, limit: int) -> dict[str, Any]:
    """Time one epoch, then train a fresh model over the epochs that fit in ``minutes``."""
    device = cfg.train.device
    tr, va = _split(data, "train", device, limit), _split(data, "val", device, limit)
    probe = dataclasses.replace(cfg.train, epochs=1)
    t0 = time.perf_counter()
    train(dataclasses.replace(cfg, train=probe), tr, va, out / "probe", resume=False)
    epoch_s = time.perf_counter() - t0
    epochs = max(1, int(minutes * 60 / epoch_s))
    steps = epochs * -(-len(tr) // cfg.train.batch_size)
    warmup = min(cfg.train.kl_warmup_steps, steps // 4)
    tc = dataclasses.replace(cfg.train, epochs=epochs, kl_warmup_steps=warmup)
    print(f"one epoch took {epoch_s:.1f} s: training {epochs} epochs, warm-up {warmup} steps")
    t0 = time.perf_counter()
    result = train(dataclasses.replace(cfg, train=tc), tr, va, out / "model", resume=False)
    seconds = time.perf_counter() - t0
    return {
        "probe_epoch_seconds": epoch_s,
        "epochs": epochs,
        "kl_warmup_steps": warmup,
        "train_seconds": seconds,
        "train_images_per_second": len(tr) * epochs / seconds,
        "best_val_nelbo": result.metrics["best_val_nelbo"],
        "parameters": result.metrics["parameters"],
        "model": result.model,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="conv-hvae")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall time")
    p.add_argument("--iw-samples", type=int, default=5000)
    p.add_argument("--images", type=int, default=1000, help="the test split's first N")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "prepared")
    p.add_argument("--out", type=Path, default=Path("gpu_frontier"))
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--train-images", type=int, default=0, help="smoke runs: the first N only")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(args.device)
    if not args.skip_throughput:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--device", args.device]
        cmd += ["--repeats", "1", "--out", str(args.out / "throughput.json")]
        report["throughput_exit_code"] = subprocess.run(cmd, cwd=ROOT, check=False).returncode

    cfg = preset_config(args.preset, args.device, args.set)
    trained = train_for(cfg, args.data, args.minutes, args.out, args.train_images)
    model = trained.pop("model")
    # binarized on the CPU, so the images are those `vae evaluate` scores on a CPU machine
    test = load_split(args.data / "test.pt")
    x = float_images(test, cfg.data.binarize, cfg.evaluate.seed)[: args.images].to(args.device)
    ev_cfg = EvaluateConfig(iw_samples=args.iw_samples, batch_size=10, seed=cfg.evaluate.seed)
    metrics = evaluate(model, x, ev_cfg)
    report.update(preset=args.preset, **trained, evaluation=metrics)
    (args.out / "gpu_frontier.json").write_text(json.dumps(report, indent=2))
    print(
        f"{args.preset} on {report.get('gpu', args.device)}: {trained['epochs']} epochs in "
        f"{trained['train_seconds']:.0f} s ({trained['train_images_per_second']:,.0f} img/s), "
        f"{trained['parameters']:,} parameters; test nll_iw {metrics['nll_iw']:.2f} nats at "
        f"K = {args.iw_samples} on the first {metrics['n_images']} images (ELBO "
        f"{-metrics['elbo']:.2f}, active units {metrics['active_units_per_layer']}), "
        f"{metrics['images_x_samples_per_second']:,.0f} images x samples/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
