"""Export latent embeddings as Parquet and measure how useful they are downstream.

For every split the posterior mean and log-variance of q(z|x) are written to
``{split}.parquet``: one row per image with ``split``, ``index`` (its position in the split),
``label`` and ``mu_0..mu_{D-1}``, ``logvar_0..logvar_{D-1}`` (float32). Embeddings are the
posterior *mean*, not a sample, so the table is deterministic.

The images embedded are the grey pixels (0..255 / 255), also for a model trained on
binarized pixels: that is what the registered model's consumers encode (``vae encode``, the
pyfunc, Spark), so a row of the table is the vector they get for the same image. One random
binarization would be worse: it throws away information the grey value holds, and an embedding
of it carries that draw's noise (benchmarks/README.md, "Embeddings").

Usefulness is measured on the test split by two classifiers trained on the train split
(:mod:`vae.evaluation.probes`): a linear probe and a k-nearest-neighbour vote.
The same two classifiers on raw pixels give the baseline the latents should be compared with.
Images labelled -1 (an unlabelled image folder) are skipped; with no labels the scores are None.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vae.atomic import atomic_write_with
from vae.config import ExportConfig
from vae.core.model import VAE, embed
from vae.data.splits import Split, batch_to_float, float_images
from vae.evaluation.probes import downstream_metrics

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["embeddings_frame", "export", "latent_matrix", "read_embeddings"]

log = logging.getLogger(__name__)

# Logistic regression on 54000 x 784 pixels takes minutes on two cores; a seeded subsample of
# this many training rows keeps the pixel baseline to seconds while staying a fair baseline.
PIXEL_PROBE_MAX_ROWS = 10_000


# ---------------------------------------------------------------------------------------------
# Tables


def embeddings_frame(
    split: str, labels: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> pd.DataFrame:
    """One row per image: split (str), index, label (int64), mu_i and logvar_i (float32).

    labels (N,), mu (N, D), logvar (N, D).
    """
    import pandas as pd

    n, d = mu.shape
    if labels.shape != (n,) or logvar.shape != (n, d):
        raise ValueError(
            f"labels {tuple(labels.shape)}, mu {tuple(mu.shape)} and logvar "
            f"{tuple(logvar.shape)} do not describe the same {n} images"
        )
    mu_np = mu.detach().float().cpu().numpy()
    logvar_np = logvar.detach().float().cpu().numpy()
    columns: dict[str, Any] = {
        "split": pd.Series([split] * n, dtype="str"),
        "index": torch.arange(n, dtype=torch.int64).numpy(),
        "label": labels.detach().cpu().to(torch.int64).numpy(),
    }
    columns.update({f"mu_{i}": mu_np[:, i] for i in range(d)})
    columns.update({f"logvar_{i}": logvar_np[:, i] for i in range(d)})
    return pd.DataFrame(columns)


def latent_matrix(frame: pd.DataFrame, prefix: str = "mu") -> torch.Tensor:
    """The ``{prefix}_0..{prefix}_{D-1}`` columns of an embeddings table as a (N, D) tensor."""
    d = sum(1 for c in frame.columns if c.startswith(f"{prefix}_"))
    cols = [f"{prefix}_{i}" for i in range(d)]
    return torch.from_numpy(frame[cols].to_numpy(dtype="float32", copy=True))


def read_embeddings(path: str | Path) -> pd.DataFrame:
    """Read a table written by :func:`export` (Parquet)."""
    import pandas as pd

    return pd.read_parquet(path)


# ---------------------------------------------------------------------------------------------
# The stage


def _scores(
    splits: Mapping[str, Split],
    mus: dict[str, torch.Tensor],
    pixels: dict[str, torch.Tensor],
    grey: dict[str, torch.Tensor],
    binarize: str,
    cfg: ExportConfig,
    pixel_probe_max_rows: int | None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Probe and k-NN scores of the embeddings, the pixels the model sees, and grey pixels."""
    if "train" in splits and "test" in splits:
        train_y, test_y = splits["train"].labels, splits["test"].labels
        latent = downstream_metrics(mus["train"], train_y, mus["test"], test_y, cfg)
        pixel = downstream_metrics(
            pixels["train"],
            train_y,
            pixels["test"],
            test_y,
            cfg,
            probe_max_rows=pixel_probe_max_rows,
        )
        # Grey pixels, the stronger baseline: binarization throws information away.
        grey_scores = pixel
        if binarize != "none":
            grey_scores = downstream_metrics(
                grey["train"],
                train_y,
                grey["test"],
                test_y,
                cfg,
                probe_max_rows=pixel_probe_max_rows,
            )
    else:
        none_x, none_y = torch.empty(0, 1), torch.empty(0, dtype=torch.long)
        latent = pixel = grey_scores = downstream_metrics(none_x, none_y, none_x, none_y, cfg)
    return latent, pixel, grey_scores


def export(
    model: VAE,
    splits: Mapping[str, Split],
    binarize: str,
    cfg: ExportConfig,
    out_dir: Path,
    pixel_probe_max_rows: int | None = PIXEL_PROBE_MAX_ROWS,
) -> dict[str, Any]:
    """Write ``out_dir/{split}.parquet`` for every split and return the downstream metrics.

    The embedded images are the grey pixels (module docstring). Scores train on ``train`` and
    test on ``test`` (None when either is missing or unlabelled): on the embeddings (mu) and, as
    the baselines, on the pixels the model sees (``pixel_*``: for dynamic data one fixed
    binarization seeded by ``cfg.seed``) and on the grey pixels (``grey_pixel_*``), whose linear
    probes train on at most ``pixel_probe_max_rows`` rows.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    embed_s = write_s = 0.0
    mus: dict[str, torch.Tensor] = {}
    pixels: dict[str, torch.Tensor] = {}  # (N, C*H*W) flattened float images, train and test
    grey: dict[str, torch.Tensor] = {}  # the same, before binarization
    rows: dict[str, int] = {}
    for name, split in splits.items():
        t0 = time.perf_counter()
        x = batch_to_float(split.images, "none")  # (N, C, H, W) grey, in [0, 1]
        mus[name], logvar = embed(model, x, cfg.batch_size)  # (N, D) each
        embed_s += time.perf_counter() - t0
        if name in ("train", "test"):
            grey[name] = x.flatten(1)
            # without binarization the model sees the grey pixels: no second copy
            seen = x if binarize == "none" else float_images(split, binarize, cfg.seed)
            pixels[name] = seen.flatten(1)
        t0 = time.perf_counter()
        frame = embeddings_frame(name, split.labels, mus[name], logvar)
        atomic_write_with(
            out_dir / f"{name}.parquet", lambda p, f=frame: f.to_parquet(p, index=False)
        )
        write_s += time.perf_counter() - t0
        rows[f"rows_{name}"] = len(split)

    latent, pixel, grey_scores = _scores(
        splits, mus, pixels, grey, binarize, cfg, pixel_probe_max_rows
    )
    metrics = {
        "linear_probe_accuracy": latent["linear_probe_accuracy"],
        "knn_accuracy": latent["knn_accuracy"],
        "pixel_linear_probe_accuracy": pixel["linear_probe_accuracy"],
        "pixel_knn_accuracy": pixel["knn_accuracy"],
        "grey_pixel_linear_probe_accuracy": grey_scores["linear_probe_accuracy"],
        "grey_pixel_knn_accuracy": grey_scores["knn_accuracy"],
        "knn_k": cfg.knn_k,
        "latent_dim": model.code_dim,  # the width of a code: all layers
        "parameters": sum(p.numel() for p in model.parameters()),
        **rows,
        **{k: v for k, v in latent.items() if k.endswith("_rows")},
        **{f"pixel_{k}": v for k, v in pixel.items() if k.endswith("_rows")},
        "embed_seconds": embed_s,
        "write_seconds": write_s,
        "linear_probe_seconds": latent["linear_probe_seconds"],
        "knn_seconds": latent["knn_seconds"],
        "pixel_linear_probe_seconds": pixel["linear_probe_seconds"],
        "pixel_knn_seconds": pixel["knn_seconds"],
        "seconds": time.perf_counter() - t_start,
    }
    log.info(
        "exported %s to %s in %.1fs",
        ", ".join(f"{k}={len(s)}" for k, s in splits.items()),
        out_dir,
        metrics["seconds"],
    )
    return metrics
