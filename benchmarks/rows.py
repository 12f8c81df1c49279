"""The driver: every row in its own child process, their repeats merged into one row each."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from classic import train_indices, unpack_raw
from measure import machine_cpu_seconds, own_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
ENTRY = Path(__file__).with_name("throughput.py")  # run again with --worker for each row

# ---------------------------------------------------------------------------------------------
# The driver


def _child(name: str, spec: dict[str, Any], tmp: Path, env: dict[str, str] | None = None) -> Any:
    """Run one row in a fresh interpreter; return its result dict, or None if it failed."""
    spec = {**spec, "result": str(tmp / f"{name}.result.json")}
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    print(f"  {name} ...", end="", file=sys.stderr, flush=True)
    t0, busy0, own0 = time.perf_counter(), machine_cpu_seconds(), own_cpu_seconds()
    proc = subprocess.run(
        [sys.executable, str(ENTRY), "--worker", str(spec_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    print(f" {wall:.0f} s", file=sys.stderr)
    if proc.returncode != 0:
        print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    result = json.loads(Path(spec["result"]).read_text())
    if busy0 is not None:  # CPU that other processes (or the hypervisor) took meanwhile
        other = machine_cpu_seconds() - busy0 - (own_cpu_seconds() - own0)
        result["other_cpu_share"] = max(0.0, other) / (wall * (os.cpu_count() or 1))
    return result


def _merge(runs: list[Any]) -> Any:
    """One row from its repeats: the timed epochs of all, the worst memory and interference."""
    if any(r is None for r in runs):
        return None
    merged = {**runs[0], "repeats": len(runs)}
    merged["seconds_by_repeat"] = [r["seconds"] for r in runs]
    merged["timed_seconds"] = [t for r in runs for t in (r["seconds"][1:] or r["seconds"])]
    merged["val_nelbo_by_repeat"] = [r["val_nelbo"][-1] for r in runs]
    for key in ("peak_rss_bytes", "other_cpu_share"):
        merged[key] = max(r.get(key, 0.0) for r in runs)
    return merged


def _summarise(name: str, label: str, res: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "label": label, "ok": res is not None}
    if res is None:
        return row
    row.update(res)
    if "val_nelbo" in res:  # a training row
        timed = res["timed_seconds"]
        row["epochs"] = len(res["seconds"])
        row["seconds_per_epoch"] = statistics.median(timed)
        row["mean_seconds_per_epoch"] = statistics.mean(timed)
        row["images_per_second"] = res["n_train"] / row["seconds_per_epoch"]
        row["final_val_nelbo"] = res["val_nelbo"][-1]
    row["peak_memory_bytes"] = res["peak_rss_bytes"]
    return row


def run_rows(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Every row, each in its own child process; (a), (b), (c) interleaved ``repeats`` times."""
    epochs = 1 + (1 if args.quick else args.epochs)
    n_eval = 100 if args.quick else args.eval_images
    data = Path(args.data).resolve()
    tv_root = unpack_raw(tmp, Path(args.raw))
    base = {"device": args.device, "data": str(data), "n_train": 6400 if args.quick else 10**9}
    base["seed"] = 0
    indices = train_indices(data, tv_root, tmp)
    train = {"epochs": epochs, "device": args.device}
    common = {"data": {"binarize": "none"}, "mlflow": {"enabled": False}}
    same_model = {
        "arch": "mlp",
        "latent_dim": 20,
        "hidden_dim": 400,
        "hidden_layers": 1,
        "prior": "standard",
        "likelihood": "bernoulli",
        "activation": "relu",
    }
    specs = {
        "a": {**base, "kind": "reference", "tv_root": str(tv_root), "indices": str(indices)},
        "b": {
            **common,
            "model": same_model,
            "train": {
                **train,
                **{"batch_size": 128, "lr": 1e-3, "lr_decay": 0.0, "ema_decay": 0.0},
                **{"grad_clip": 0.0, "kl_warmup_steps": 0},
            },
        },
        "c": {**common, "train": train},
    }
    specs["a"]["epochs"] = epochs
    labels = {
        "a": "(a) reference: classic recipe, 784-400-20",
        "b": "(b) vae.training.train, 784-400-20, batch 128, Adam 1e-3",
        "c": "(c) vae.training.train, default params",
    }
    repeats = 1 if args.quick else args.repeats
    print(f"benchmark on {args.device}: {epochs} epochs a row, {repeats} repeats", file=sys.stderr)
    runs: dict[str, list[Any]] = {k: [] for k in specs}
    for rep in range(repeats):
        for k, spec in specs.items():
            if k != "a":  # spec holds the params; each repeat trains from scratch in its folder
                spec = {**base, "kind": "ours", "out_dir": str(tmp / f"{k}{rep}"), "params": spec}
            runs[k].append(_child(f"{k}{rep}", spec, tmp))
    rows = [_summarise(k, labels[k], _merge(runs[k])) for k in specs]

    cli_train = {"epochs": 1 if args.quick else 2, "device": args.device}
    spec_d = {**base, "kind": "cli", "out_dir": str(tmp / "d"), "params": {"train": cli_train}}
    (tmp / "d").mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'd' / 'mlflow.db'}"}
    res = _merge([_child("d", spec_d, tmp, env)])
    rows.append(_summarise("d", "(d) `vae train` CLI, default params", res))

    model_path = tmp / "c0" / "model.pt"
    for k in (100, 1000):
        spec_e = {**base, "kind": "iwae", "model": str(model_path), "n": n_eval, "k": k}
        res = _child(f"e{k}", spec_e, tmp) if model_path.exists() else None
        rows.append(_summarise(f"e{k}", f"(e) IWAE eval, K={k}, {n_eval} images", res))
    return rows
