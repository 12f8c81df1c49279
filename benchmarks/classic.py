"""Row (a): the classic pytorch/examples VAE recipe, and the torchvision files it reads.

``run_reference`` runs in the row's child process (see ``workers.WORKERS``); ``unpack_raw`` and
``train_indices`` run in the driver, once, to give it the raw IDX files and the rows of the
prepared train split.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from measure import sync
from torch import nn

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

    code_dim = 20

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
        return VAEOutput(q, BernoulliLikelihood(logits), z, StandardNormal(self.code_dim))


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
        sync(device)
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
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return {"seconds": seconds, "val_nelbo": val_nelbo, "n_train": len(keep)}


# ---------------------------------------------------------------------------------------------
# (a)'s inputs, prepared by the driver


def unpack_raw(tmp: Path, raw_root: Path) -> Path:
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


def train_indices(data: Path, tv_root: Path, tmp: Path) -> Path:
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
