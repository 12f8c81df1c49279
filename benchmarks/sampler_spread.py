"""How wide are the diffusion sampler's draws, against the training codes it was fitted to?

For a trained workspace (``models/model.pt``, ``models/sampler.safetensors``, the prepared
splits): the standard deviation of the draws over the active dimensions, as a multiple of the
codes' (1 is the codes' own spread), their mean norm and the share of coordinates at the clip's
box, at each temperature. One thread, seeded: the figures of docs/models.md.

    python benchmarks/sampler_spread.py [WORKSPACE] [--temperatures 0.9 1 1.1 1.2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vae.core.sampler import load_sampler
from vae.data.splits import load_split
from vae.params import load_params
from vae.training.checkpoint import load_model
from vae.training.latent import latent_codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace", nargs="?", type=Path, default=Path("."))
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.9, 1.0, 1.1, 1.2])
    ap.add_argument("-n", type=int, default=10_000, help="draws per temperature")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = args.workspace
    params = load_params(root / "params.yaml")
    model, _ = load_model(root / "models" / "model.pt")
    _, fitted = load_sampler(root / "models" / "sampler.safetensors")
    if "diffusion" not in fitted:
        raise SystemExit(f"{root}/models/sampler.safetensors holds no diffusion sampler")
    d = fitted["diffusion"]
    train = load_split(root / "data" / "prepared" / "train.pt")
    z = latent_codes(model, train, params.data.binarize, params.generate.seed)
    codes = d.standardized(z)  # the active dimensions, as the diffusion model sees them
    print(f"codes: {d.active.numel()} active dimensions, mean norm {codes.norm(dim=1).mean():.2f}")
    for t in args.temperatures:
        x = d.standardized(d.sample(args.n, torch.Generator().manual_seed(0), t))
        ratio = (x.std(0) / codes.std(0)).mean()
        edge = ((x <= d.low + 1e-4) | (x >= d.high - 1e-4)).float().mean()
        print(
            f"t = {t:g}: standard deviation {ratio:.3f} x the codes', "
            f"mean norm {x.norm(dim=1).mean():.2f}, at the box {100 * edge:.2f}%"
        )


if __name__ == "__main__":
    main()
