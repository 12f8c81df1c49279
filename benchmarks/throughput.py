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
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
MIB = 2**20
TARGETS = {"b_over_a": 2.0, "c_over_a": 3.0, "cli_peak_rss_bytes": 2 * GIB}


# ---------------------------------------------------------------------------------------------
# (a) the classic recipe (pytorch/examples, vae/main.py), kept as it is there


class ClassicVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc4(F.relu(self.fc3(z)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def classic_loss(
    recon_x: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


class ClassicAsVAE(nn.Module):
    """The classic model behind ``vae.core.model.VAE``'s interface, so one function scores both."""

    latent_dim = 20

    def __init__(self, ref: ClassicVAE) -> None:
        super().__init__()
        self.ref = ref

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, eps: Any = None
    ) -> Any:
        from vae.core.distributions import BernoulliLikelihood, DiagonalGaussian, StandardNormal
        from vae.core.model import VAEOutput

        q = DiagonalGaussian(*self.ref.encode(x.view(-1, 784)))  # (B, 20) each
        z = q.sample(generator) if eps is None else q.mean + q.std * eps
        logits = self.ref.decode_logits(z).view(-1, *x.shape[1:])  # (B, 1, 28, 28)
        return VAEOutput(q, BernoulliLikelihood(logits), z, StandardNormal(self.latent_dim))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_reference(spec: dict[str, Any]) -> dict[str, Any]:
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from vae.data.splits import float_images, load_split
    from vae.training.train import evaluate_elbo

    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    keep = torch.load(spec["indices"], weights_only=True)[: spec["n_train"]]
    dataset = datasets.FashionMNIST(
        spec["tv_root"], train=True, download=False, transform=transforms.ToTensor()
    )
    kwargs = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
    train_loader = DataLoader(
        Subset(dataset, keep.tolist()), batch_size=128, shuffle=True, **kwargs
    )
    x_val = float_images(load_split(Path(spec["data"]) / "val.pt", device), "none", 0)
    model = ClassicVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    seconds, val_nelbo = [], []
    for _ in range(spec["epochs"]):
        _sync(device)
        t0 = time.perf_counter()
        model.train()
        train_loss = 0.0
        for data, _ in train_loader:
            data = data.to(device)
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(data)
            loss = classic_loss(recon_batch, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        val = evaluate_elbo(ClassicAsVAE(model), x_val, spec["seed"] + 3)
        val_nelbo.append(-float(val.elbo))
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return {"seconds": seconds, "val_nelbo": val_nelbo, "n_train": len(keep)}


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
    _sync(device)
    before = _peak_rss()
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


def _peak_rss() -> int:
    """This process's peak resident set size in bytes.

    Linux's ``getrusage(RUSAGE_SELF).ru_maxrss`` survives ``execve``: a child forked from this
    driver would report the driver's own RSS as its peak. ``VmHWM`` belongs to the process's
    own address space, so it starts afresh at exec; elsewhere fall back to ``ru_maxrss``.
    """
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(ln for ln in status if ln.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
            1 if sys.platform == "darwin" else 1024
        )


def worker_main(spec_path: str) -> int:
    rss_at_start = _peak_rss()  # torch is imported by now: the floor under every row
    spec = json.loads(Path(spec_path).read_text())
    result = WORKERS[spec["kind"]](spec)
    result["peak_rss_bytes"] = _peak_rss()
    result["rss_after_import_torch_bytes"] = rss_at_start
    if spec.get("device", "cpu").startswith("cuda"):
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# The driver


def _child(name: str, spec: dict[str, Any], tmp: Path, env: dict[str, str] | None = None) -> Any:
    """Run one row in a fresh interpreter; return its result dict, or None if it failed."""
    spec = {**spec, "result": str(tmp / f"{name}.result.json")}
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    print(f"  {name} ...", end="", file=sys.stderr, flush=True)
    t0, busy0, own0 = time.perf_counter(), _machine_cpu_seconds(), _own_cpu_seconds()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(spec_path)],
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
        other = _machine_cpu_seconds() - busy0 - (_own_cpu_seconds() - own0)
        result["other_cpu_share"] = max(0.0, other) / (wall * (os.cpu_count() or 1))
    return result


def _machine_cpu_seconds() -> float | None:
    """CPU seconds used by every process on the machine, steal included (Linux only)."""
    try:
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = cpu
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _unpack_raw(tmp: Path, raw_root: Path) -> Path:
    """The raw IDX files, unpacked where torchvision's FashionMNIST(download=False) reads them."""
    from vae.data.raw import idx_files

    files = idx_files(raw_root)
    raw = tmp / "torchvision" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in files.values():
        dest = raw / path.name.removesuffix(".gz")
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as src, dest.open("wb") as out:
                shutil.copyfileobj(src, out)
        else:
            shutil.copyfile(path, dest)
    return tmp / "torchvision"


def _train_indices(data: Path, tv_root: Path, tmp: Path) -> Path:
    """The rows of torchvision's train set that form the prepared train split (checked)."""
    from torchvision import datasets

    from vae.data.splits import load_split

    manifest = json.loads((data / "manifest.json").read_text())
    if manifest["dataset"] != "fashion_mnist" or manifest["binarize"] == "static":
        sys.exit(
            f"{data}: prepared from {manifest['dataset']} with data.binarize: "
            f"{manifest['binarize']}; the benchmark needs grayscale Fashion-MNIST "
            "(run `vae prepare` with the default data params)"
        )
    images = datasets.FashionMNIST(str(tv_root), train=True, download=False).data  # (N, 28, 28)
    gen = torch.Generator().manual_seed(manifest["seed"])  # vae.data.prepare.prepare's split
    perm = torch.randperm(len(images), generator=gen)
    keep = perm[max(1, round(len(images) * manifest["val_fraction"])) :].sort().values
    if not torch.equal(images[keep].unsqueeze(1), load_split(data / "train.pt").images):
        sys.exit(f"{data}/train.pt is not the expected rows of the raw train set; rerun prepare")
    torch.save(keep, tmp / "train_indices.pt")
    return tmp / "train_indices.pt"


def _machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {
        "cpu_model": model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


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


def run_rows(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Every row, each in its own child process; (a), (b), (c) interleaved ``repeats`` times."""
    epochs = 1 + (1 if args.quick else args.epochs)
    n_eval = 100 if args.quick else args.eval_images
    data = Path(args.data).resolve()
    tv_root = _unpack_raw(tmp, Path(args.raw))
    base = {"device": args.device, "data": str(data), "n_train": 6400 if args.quick else 10**9}
    base["seed"] = 0
    indices = _train_indices(data, tv_root, tmp)
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
    machine = _machine()
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
