"""Seconds per training epoch of presets on this machine, and what a preset's run would take.

Each preset trains 1 warm-up + ``--epochs`` timed epochs on ``data/prepared`` (after `vae
prepare`), in a fresh child process, with the preset's params (the epoch count aside, which
only sets how many run), MLflow off. It prints the median timed epoch and the preset's
``train.epochs`` times it: the training time of its full run on a quiet machine, without the
per-epoch checkpoint writes::

    python benchmarks/epoch_time.py default hvae          # about 2 minutes on 2 CPU cores
    python benchmarks/epoch_time.py hvae --set train.objective=iwae --set model.latent_layers=1

Run it on a quiet machine: another job on 2 cores slows every epoch several times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(overrides: dict[str, object], epochs: int, data: str, out: str) -> None:
    """Train ``1 + epochs`` epochs; write the per-epoch seconds to ``out``."""
    sys.path.insert(0, str(ROOT))
    import yaml

    from vae.data.splits import load_split
    from vae.params import parse_params
    from vae.presets import apply_preset
    from vae.training.train import train

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = apply_preset(raw, {**overrides, "train.epochs": 1 + epochs, "mlflow.enabled": False})
    cfg = parse_params(raw)
    split = {n: load_split(Path(data) / f"{n}.pt") for n in ("train", "val")}
    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, split["train"], split["val"], Path(tmp), resume=False)
    Path(out).write_text(json.dumps([row["seconds"] for row in result.history]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("presets", nargs="+", help="names in presets.yaml, or default (params.yaml)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs after 1 warm-up")
    p.add_argument("--data", default=str(ROOT / "data" / "prepared"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import yaml

    if args.child:  # a row, in its own process
        spec = json.loads(args.child)
        _child(spec["overrides"], args.epochs, args.data, spec["out"])
        return 0
    sys.path.insert(0, str(ROOT))
    from vae.presets import load_presets

    table = load_presets(ROOT / "presets.yaml")
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    print(f"| preset | s/epoch (median of {args.epochs}) | train.epochs | full run |")
    print("| --- | --- | --- | --- |")
    for name in args.presets:
        overrides = {**({} if name == "default" else table[name]), **extra}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "seconds.json"
            spec = json.dumps({"overrides": overrides, "out": str(out)})
            cmd = [sys.executable, __file__, name, "--epochs", str(args.epochs)]
            cmd += ["--data", args.data, "--child", spec]
            subprocess.run(cmd, check=True, env=os.environ)
            seconds = json.loads(out.read_text())[1:]
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        epochs = overrides.get("train.epochs", raw["train"]["epochs"])
        per = statistics.median(seconds)
        print(f"| {name} | {per:.2f} | {epochs} | {epochs * per / 60:.1f} min |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
