"""The child-process side of ``throughput.py --worker SPEC``: one row, one fresh interpreter.

``worker_main`` reads the spec, runs the row's ``WORKERS[kind]`` and writes its result, with the
process's peak memory, where the driver reads it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from classic import run_reference
from measure import peak_rss, sync

# ---------------------------------------------------------------------------------------------
# (b), (c): vae.training.train; (d): the `vae train` command; (e): vae.evaluation.evaluate


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    from vae.data.splits import Split, load_split
    from vae.params import parse_params
    from vae.training.train import train

    cfg = parse_params(spec["params"])
    device = torch.device(cfg.train.device)
    data = Path(spec["data"])
    tr = load_split(data / "train.pt", device)
    tr = Split(tr.images[: spec["n_train"]], tr.labels[: spec["n_train"]])
    val = load_split(data / "val.pt", device)
    result = train(cfg, tr, val, Path(spec["out_dir"]), resume=False)
    return {
        "seconds": [r["seconds"] for r in result.history],
        "val_nelbo": [r["val_nelbo"] for r in result.history],
        "n_train": len(tr),
    }


def run_cli(spec: dict[str, Any]) -> dict[str, Any]:
    import yaml

    from vae.cli import main as vae_main
    from vae.params import parse_params

    work = Path(spec["out_dir"])
    params = work / "params.yaml"  # every section, as the CLI requires
    params.write_text(yaml.safe_dump(parse_params(spec["params"]).to_dict()))
    argv = ["--params", str(params), "-q", "train", "--data", spec["data"], "--no-resume"]
    argv += [f"--{d}={work / d}" for d in ("models", "metrics", "plots")]
    t0 = time.perf_counter()
    code = vae_main(argv)
    if code != 0:
        raise RuntimeError(f"vae train exited with code {code}")
    metrics = json.loads((work / "metrics" / "train.json").read_text())
    rows = (work / "plots" / "train.csv").read_text().splitlines()
    header = rows[0].split(",")
    history = [dict(zip(header, r.split(","), strict=True)) for r in rows[1:]]
    return {
        "seconds": [float(r["seconds"]) for r in history],
        "val_nelbo": [float(r["val_nelbo"]) for r in history],
        "n_train": round(metrics["train_images_per_second"] * metrics["seconds_per_epoch"]),
        "wall_seconds": time.perf_counter() - t0,
    }


def run_iwae(spec: dict[str, Any]) -> dict[str, Any]:
    from vae.config import EvaluateConfig
    from vae.data.splits import Split, float_images, load_split
    from vae.evaluation.evaluate import evaluate
    from vae.training.checkpoint import load_model

    device = torch.device(spec["device"])
    model, _ = load_model(spec["model"], device=device)
    test = load_split(Path(spec["data"]) / "test.pt", device)
    x = float_images(Split(test.images[: spec["n"]], test.labels[: spec["n"]]), "none", 0)
    evaluate(model, x[:100], EvaluateConfig(iw_samples=10))  # warm-up: allocator, kernels
    sync(device)
    before = peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        gpu_before = torch.cuda.memory_allocated(device)
    m = evaluate(model, x, EvaluateConfig(iw_samples=spec["k"]))
    out = {
        "seconds": m["seconds"],
        "images_x_samples_per_second": m["images_x_samples_per_second"],
        "nll_iw": m["nll_iw"],
        "n_images": m["n_images"],
        "iw_samples": m["iw_samples"],
        "rss_before_bytes": before,
    }
    if device.type == "cuda":
        out["gpu_increase_bytes"] = torch.cuda.max_memory_allocated(device) - gpu_before
    return out


WORKERS = {"reference": run_reference, "ours": run_ours, "cli": run_cli, "iwae": run_iwae}


def worker_main(spec_path: str) -> int:
    rss_at_start = peak_rss()  # torch is imported by now: the floor under every row
    spec = json.loads(Path(spec_path).read_text())
    result = WORKERS[spec["kind"]](spec)
    result["peak_rss_bytes"] = peak_rss()
    result["rss_after_import_torch_bytes"] = rss_at_start
    if spec.get("device", "cpu").startswith("cuda"):
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    Path(spec["result"]).write_text(json.dumps(result))
    return 0
