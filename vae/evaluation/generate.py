"""PNG grids that show what the model learned: samples, reconstructions, interpolations, and
the test set's posterior means in two dimensions.

Every random draw comes from a ``torch.Generator`` seeded with ``generate.seed`` (on the model's
device), and the scatter plot is written without a timestamp or version in its metadata, so a
rerun on the same machine writes byte-identical files. The maths (the interpolation line and
the PCA projection) are small pure functions; ``generate`` only draws, decodes and writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vae.atomic import atomic_write_with
from vae.config import GenerateConfig
from vae.core.model import VAE, embed, eval_mode
from vae.data.splits import Split, batch_to_float

__all__ = [
    "generate",
    "interleave_rows",
    "interpolate",
    "latent_coords",
    "pca_2d",
]

NAMES = ("samples", "samples_stochastic", "reconstructions", "interpolations", "latent_2d")


# ---------------------------------------------------------------------------------------------
# Maths


def interpolate(z_a: torch.Tensor, z_b: torch.Tensor, steps: int) -> torch.Tensor:
    """Points on the straight line from z_a to z_b: (P, D), (P, D) -> (P, steps, D).

    Column 0 is z_a and column steps-1 is z_b exactly.
    """
    t = torch.linspace(0.0, 1.0, steps, device=z_a.device, dtype=z_a.dtype)  # (S,)
    t = t.view(1, steps, 1)
    return (1.0 - t) * z_a.unsqueeze(1) + t * z_b.unsqueeze(1)


def pca_2d(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project z (N, D), D >= 2, onto its first two principal components.

    Returns the coordinates (N, 2) and the share of the variance each component explains (2,).
    Uses the exact SVD of the centred data (deterministic, unlike the randomised
    ``torch.pca_lowrank``) and fixes each component's sign so its largest loading is positive.
    """
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"pca_2d needs (N, D) with D >= 2, got {tuple(z.shape)}")
    zc = z.double() - z.double().mean(0, keepdim=True)  # (N, D)
    _, s, vh = torch.linalg.svd(zc, full_matrices=False)  # vh (D, D): rows are components
    v = vh[:2]  # (2, D)
    pivot = v.abs().argmax(1, keepdim=True)  # (2, 1)
    v = v * torch.sign(v.gather(1, pivot))
    explained = s[:2].pow(2) / s.pow(2).sum().clamp_min(1e-300)  # (2,)
    return (zc @ v.T).float(), explained.float()


def latent_coords(mu: torch.Tensor) -> tuple[torch.Tensor, tuple[str, str]]:
    """Posterior means (N, D) -> 2-D points (N, 2) to plot and the names of their axes.

    D > 2: the first two principal components; D == 2: z itself; D == 1: z against zero.
    """
    d = mu.shape[1]
    if d > 2:
        coords, explained = pca_2d(mu)
        pc1, pc2 = (f"PC {i + 1} ({100 * e:.1f}% of variance)" for i, e in enumerate(explained))
        return coords, (pc1, pc2)
    if d == 2:
        return mu.float(), ("z_0", "z_1")
    return torch.cat([mu.float(), mu.new_zeros(mu.shape[0], 1)], 1), ("z_0", "")


def interleave_rows(a: torch.Tensor, b: torch.Tensor, nrow: int) -> torch.Tensor:
    """Alternate rows of ``nrow`` images from a and b: a[0:nrow], b[0:nrow], a[nrow:2nrow], ...

    a, b (N, C, H, W) -> (2 * ceil(N / nrow) * nrow, C, H, W); a short last row is padded with
    blank (zero) images so each original stays directly above its partner.
    """
    n = a.shape[0]
    rows = -(-n // nrow)
    pad = rows * nrow - n
    a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])])
    b = torch.cat([b, b.new_zeros(pad, *b.shape[1:])])
    pairs = torch.stack([a.view(rows, nrow, *a.shape[1:]), b.view(rows, nrow, *b.shape[1:])], 1)
    return pairs.reshape(-1, *a.shape[1:])  # (rows, 2, nrow, ...) -> (2 * rows * nrow, ...)


# ---------------------------------------------------------------------------------------------
# Writing


def _write_grid(path: Path, images: torch.Tensor, nrow: int) -> None:
    """images (N, C, H, W) in [0, 1] -> one PNG grid, ``nrow`` images a row, 2-pixel padding."""
    from torchvision.utils import save_image

    images = images.detach().float().clamp(0.0, 1.0).cpu()
    atomic_write_with(path, lambda p: save_image(images, p, nrow=nrow, padding=2, format="png"))


def _write_scatter(
    path: Path,
    coords: torch.Tensor,
    labels: torch.Tensor,
    axis_names: tuple[str, str],
    class_names: Sequence[str] | None,
) -> None:
    """coords (N, 2), labels (N,) -> a scatter coloured by label, with a legend (-1: unlabelled)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas is used

    fig = Figure(figsize=(7, 6), dpi=100)
    ax = fig.add_subplot()
    xy, labels = coords.cpu().numpy(), labels.cpu()
    for y in sorted(set(labels.tolist())):
        mask = (labels == y).numpy()
        if y < 0:
            name, color = "unlabelled", "0.6"
        else:
            name = class_names[y] if class_names and y < len(class_names) else str(y)
            color = f"C{y % 10}"  # matplotlib's default cycle: tab10
        ax.scatter(xy[mask, 0], xy[mask, 1], s=2, alpha=0.6, color=color, label=name, lw=0)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(f"Test-set posterior means (n = {len(labels)})")
    ax.legend(markerscale=5, fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    atomic_write_with(path, lambda p: fig.savefig(p, format="png", metadata={"Software": None}))


# ---------------------------------------------------------------------------------------------
# The stage


@torch.no_grad()
def generate(
    model: VAE,
    test: Split,
    cfg: GenerateConfig,
    out_dir: Path,
    class_names: Sequence[str] | None = None,
    batch_size: int = 1000,
) -> dict[str, str]:
    """Write the five PNGs to ``out_dir`` and return ``{name: path}``.

    - ``samples``: decoder means of ``cfg.n_samples`` draws of z from ``model.latent_sampler``
      (the prior N(0, I) when it is None);
    - ``samples_stochastic``: the same z, but x ~ p(x|z) drawn from the decoder;
    - ``reconstructions``: rows of test images, each followed by a row of their
      reconstructions (decoder mean at the posterior mean);
    - ``interpolations``: ``cfg.n_interpolations`` rows, each the straight line between the
      posterior means of two test images, ``cfg.interpolation_steps`` columns;
    - ``latent_2d``: the test set's posterior means (PCA to 2-D when latent_dim > 2).

    Test images are their grey pixels, as ``vae export`` embeds them, so the scatter shows
    exactly the ``mu`` columns of ``test.parquet``.
    """
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    with eval_mode(model):
        paths = {name: out_dir / f"{name}.png" for name in NAMES}

        # Samples: the same z twice (generators seeded alike), mean and then a draw.
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        _write_grid(paths["samples"], model.generate(cfg.n_samples, gen, mean=True), cfg.nrow)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        x_sample = model.generate(cfg.n_samples, gen, mean=False)
        _write_grid(paths["samples_stochastic"], x_sample, cfg.nrow)

        x = batch_to_float(test.images, "none")  # (N, C, H, W) grey, in [0, 1]
        mu, _ = embed(model, x, batch_size)  # (N, D) on the CPU
        n = x.shape[0]
        if n == 0:
            raise ValueError("generate: the test split is empty")
        pick = torch.Generator().manual_seed(cfg.seed)  # CPU: indices do not depend on device

        idx = _choose(n, cfg.n_reconstructions, pick)
        x_hat = model.decode(mu[idx].to(device)).mean
        grid = interleave_rows(x[idx].to(device), x_hat, cfg.nrow)
        _write_grid(paths["reconstructions"], grid, cfg.nrow)

        ends = _choose(n, 2 * cfg.n_interpolations, pick).view(2, -1)  # (2, P)
        z = interpolate(mu[ends[0]], mu[ends[1]], cfg.interpolation_steps)  # (P, S, D)
        x_line = model.decode(z.to(device)).mean  # (P, S, C, H, W)
        _write_grid(paths["interpolations"], x_line.flatten(0, 1), cfg.interpolation_steps)

        coords, axes = latent_coords(mu)
        _write_scatter(paths["latent_2d"], coords, test.labels, axes, class_names)
    return {name: str(p) for name, p in paths.items()}


def _choose(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k indices into range(n), distinct while k <= n (a seeded permutation, repeated if not)."""
    perm = torch.randperm(n, generator=gen)
    return perm.repeat(-(-k // n))[:k]
