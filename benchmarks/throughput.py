"""Training and evaluation throughput against the classic PyTorch VAE recipe, in one run.

Run it from the project root, after `vae prepare` (or `make pipeline`) has written
``data/prepared/``::

    python benchmarks/throughput.py                  # CPU, 1 warm-up + 4 timed epochs each
    python benchmarks/throughput.py --device cuda    # the same on a GPU
    python benchmarks/throughput.py --quick          # smoke run: 6400 images, 1 + 1 epochs
    python benchmarks/throughput.py --epochs 8 --repeats 3 --out /tmp/results.json

The default run takes about 4 minutes on 2 CPU cores. ``--quick`` only checks that everything
runs: with 6,400 training images the 6,000-image validation pass dominates each epoch, so its
ratios mean nothing.

It prints one Markdown table and writes ``benchmarks/results.json`` (the same numbers, per-epoch
times, the machine and the targets). Each row runs in a fresh child process, so the peak
memory of one row never includes another's. Rows (a), (b) and (c) run ``--repeats`` times
(default 3), interleaved a, b, c, a, b, c, ... so that a slow spell of the machine does not land
on one row only; their times pool the timed epochs of all repeats. All training rows use the
same machine, the same 54,000 training images (the prepared train split) and the same 6,000
validation images.

Rows:

(a) **reference**: the classic pytorch/examples ``vae/main.py`` recipe, written out here: a
    torchvision ``FashionMNIST`` dataset (read from the raw IDX files, unpacked into a temporary
    folder) with per-image ``transforms.ToTensor()``, restricted by ``Subset`` to the images of
    the prepared train split (the validation images must not be trained on); a
    ``DataLoader(batch_size=128, shuffle=True)`` with the classic's own settings, i.e. no extra
    arguments on the CPU (``num_workers=0``) and ``num_workers=1, pin_memory=True`` on CUDA;
    the MLP 784-400-20 with ReLU and a sigmoid output; Adam 1e-3; loss = summed
    ``binary_cross_entropy(recon, x)`` + KL summed over the batch; ``train_loss +=
    loss.item()`` every step. Its progress print every 10 batches is left out (that only makes
    the reference slower). Instead of the classic's test pass, each epoch ends with the same
    validation pass as ``vae.training.train`` (see "val -ELBO").
(b) **ours, same recipe**: ``vae.training.train.train``, ``parse_params`` of model 784-400-20 with
    ReLU, Bernoulli likelihood, batch 128, Adam 1e-3 with a constant lr (``train.lr_decay: 0``),
    no EMA and no gradient clipping,
    ``data.binarize: none`` (BCE on grayscale pixels, the objective of (a)), MLflow off: what
    the training loop alone buys.
(c) **ours, defaults**: ``parse_params({})`` defaults (a gated MLP 784-300-300-40, batch 256,
    Adam 3e-3 with the lr annealed over the last 20% of the steps, an EMA of the weights, ...),
    except
    ``data.binarize: none`` so that the objective is the same as (a)'s.
(d) **`vae train` CLI**: the real command on the default params (dynamic binarization, MLflow
    on, into a temporary sqlite store), for 2 epochs; for its peak memory (the target is
    < 2 GiB). Its throughput includes the Bernoulli draw; its -ELBO is on binarized pixels and
    is not comparable, so it is not shown.
(e) **IWAE eval**: ``vae.evaluation.evaluate.evaluate`` (the importance-weighted log p(x), K samples
    an image) on the first ``--eval-images`` test images, with the model that (c) trained; one
    child process per K.

Columns:

- ``epochs``: 1 warm-up epoch + E timed epochs (E = ``--epochs``). Every training row runs the
  same number, so the -ELBO values compare quality at equal training.
- ``s/epoch``: the median wall time of the timed epochs of all repeats (each epoch's time,
  and the mean, are in the JSON). One epoch is one pass over the training images plus one
  single-sample ELBO pass over the validation images: what the ``seconds`` column of
  ``vae.training.train``'s history covers (checkpoint writing is outside it). On CUDA the
  reference is synchronised around its timing; ``vae.training.train`` syncs once an epoch. For
  (e), the wall time of one ``evaluate`` call.
- ``throughput``: training images per second over the timed epochs; for (e), images x K per
  second. ``vs (a)``: throughput divided by (a)'s.
- ``val -ELBO``: validation negative ELBO after the last epoch, in nats per image (lower is
  better): ``vae.training.train.evaluate_elbo`` on one validation tensor for every row (floats in
  [0, 1], one posterior sample with the same seed, Bernoulli log-likelihood on grayscale
  pixels + closed-form KL, mean over images). Training is seeded, so on the CPU every repeat
  reaches the same value (the JSON keeps each). On CUDA, (b) and (c) evaluate under the default
  bf16 autocast and (a) in float32.
- ``peak memory``: the child process's peak resident set size (``VmHWM``; ``ru_maxrss`` is
  not used on Linux because it carries the forking driver's peak across ``exec``). It includes
  the interpreter and PyTorch themselves (about 0.65 GiB for the CUDA build of torch; the
  RSS right after ``import torch`` is printed below the table). The reference's DataLoader
  worker on CUDA is a separate process and is not included. On CUDA also
  ``torch.cuda.max_memory_allocated``. For (e) also the increase during the ``evaluate`` call.

The ratios (b)/(a) and (c)/(a) and the team's targets ((b)/(a) >= 2, (c)/(a) >= 3, (c)'s
val -ELBO <= (a)'s, (d) < 2 GiB) are printed below the table and stored in the JSON. Timings
on a busy machine are meaningless: for every row the share of the machine's CPU that other
processes (or the hypervisor) took while it ran is measured from ``/proc/stat``, and a row
above 5% is named with a warning to rerun when the machine is quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from measure import describe_machine
from rows import ROOT, run_rows
from workers import worker_main

GIB = 2**30
MIB = 2**20
TARGETS = {"b_over_a": 2.0, "c_over_a": 3.0, "cli_peak_rss_bytes": 2 * GIB}


def _mem(row: dict[str, Any]) -> str:
    text = f"{row['peak_memory_bytes'] / MIB:,.0f} MiB RSS"
    if "rss_before_bytes" in row:
        text += f" (+{(row['peak_rss_bytes'] - row['rss_before_bytes']) / MIB:,.0f} in eval)"
    if "gpu_increase_bytes" in row:
        text += f"; GPU +{row['gpu_increase_bytes'] / MIB:,.0f} MiB in eval"
    elif row.get("gpu_peak_bytes"):
        text += f"; GPU {row['gpu_peak_bytes'] / MIB:,.0f} MiB"
    return text


def _table(rows: list[dict[str, Any]], ref_ips: float | None) -> str:
    head = ["run", "epochs", "s/epoch", "throughput", "vs (a)", "val -ELBO", "peak memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        if not r["ok"]:
            cells = [r["label"], "failed", "", "", "", "", ""]
        elif r["name"].startswith("e"):
            cells = [
                r["label"],
                "",
                f"{r['seconds']:.2f}",
                f"{r['images_x_samples_per_second']:,.0f} img x K/s",
                "",
                "",
                _mem(r),
            ]
        else:
            ratio = r["images_per_second"] / ref_ips if ref_ips and r["name"] != "d" else None
            cells = [
                r["label"],
                f"1 + {r['epochs'] - 1}" + (f", x{r['repeats']}" if r["repeats"] > 1 else ""),
                f"{r['seconds_per_epoch']:.2f}",
                f"{r['images_per_second']:,.0f} img/s",
                f"{ratio:.2f}x" if ratio else "",
                f"{r['final_val_nelbo']:.2f}" if r["name"] != "d" else "",
                _mem(r),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows: list[dict[str, Any]], command: str, load: list[Any]) -> dict[str, Any]:
    """Print the table, the ratios and the targets; return what results.json holds."""
    by = {r["name"]: r for r in rows}
    ref_ips = by["a"].get("images_per_second")
    ratios = {
        f"{n}_over_a": by[n]["images_per_second"] / ref_ips
        for n in ("b", "c")
        if ref_ips and by[n]["ok"]
    }
    targets = {
        "b_over_a >= 2": ratios.get("b_over_a", 0.0) >= TARGETS["b_over_a"],
        "c_over_a >= 3": ratios.get("c_over_a", 0.0) >= TARGETS["c_over_a"],
        "c val -ELBO <= a val -ELBO": by["a"]["ok"]
        and by["c"]["ok"]
        and by["c"]["final_val_nelbo"] <= by["a"]["final_val_nelbo"],
        "vae train peak RSS < 2 GiB": by["d"]["ok"]
        and by["d"]["peak_memory_bytes"] < TARGETS["cli_peak_rss_bytes"],
    }
    machine = describe_machine()
    print(_table(rows, ref_ips))
    print()
    cpu, cores = machine["cpu_model"], machine["cpu_cores"]
    print(f"machine: {cpu}, {cores} cores, torch {machine['torch']}; command: {command}")
    print("ratios: " + ", ".join(f"{k.replace('_over_', '/')} {v:.2f}" for k, v in ratios.items()))
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    busy = {r["name"]: r["other_cpu_share"] for r in rows if r.get("other_cpu_share", 0) > 0.05}
    print(
        f"load average {load[0][0]:.2f} before, {load[1][0]:.2f} after; "
        + (
            "other processes took "
            + ", ".join(f"{v:.0%} of the CPU during ({k})" for k, v in busy.items())
            + ": rerun when the machine is quiet"
            if busy
            else "other processes took < 5% of the CPU during every row"
        )
    )
    floor = min((r["rss_after_import_torch_bytes"] for r in rows if r["ok"]), default=0)
    print(f"peak memory includes {floor / MIB:,.0f} MiB RSS of `import torch` alone")
    return {
        "command": command,
        "machine": machine,
        "load_average": {"before": load[0], "after": load[1]},
        "rows": rows,
        "ratios": ratios,
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--epochs", type=int, default=4, help="timed epochs after 1 warm-up epoch")
    p.add_argument("--repeats", type=int, default=3, help="runs of each of (a), (b), (c)")
    p.add_argument("--quick", action="store_true", help="smoke run: 6400 images, 1 + 1 epochs")
    p.add_argument("--eval-images", type=int, default=1000, help="test images for (e)")
    p.add_argument("--data", default=str(ROOT / "data" / "prepared"))
    p.add_argument(
        "--raw",
        default=str(ROOT / "data" / "raw"),
        help="the ingested raw IDX files that `vae prepare` read (default: %(default)s)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available")
    if args.epochs < 1 or args.repeats < 1:
        p.error("--epochs and --repeats: expected at least 1")
    if not (Path(args.data) / "manifest.json").exists():
        p.error(f"--data {args.data}: no prepared data; run `dvc repro prepare` (or `make bench`)")
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vae-bench-") as tmp:
        rows = run_rows(args, Path(tmp))
    results = report(rows, command.strip(), [load_before, os.getloadavg()])
    results.update(
        device=args.device,
        epochs={"warmup": 1, "timed": 1 if args.quick else args.epochs},
        repeats=1 if args.quick else args.repeats,
        reference_dataloader={"num_workers": 1 if args.device.startswith("cuda") else 0},
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
