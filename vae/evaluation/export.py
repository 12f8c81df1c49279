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

Usefulness is measured on the test split by two classifiers trained on the train split: a
linear probe (logistic regression on standardised features) and a k-nearest-neighbour vote.
The same two classifiers on raw pixels give the baseline the latents should be compared with.
Images labelled -1 (an unlabelled image folder) are skipped; with no labels the scores are None.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vae.atomic import atomic_write_with
from vae.config import ExportConfig
from vae.core.model import VAE, embed
from vae.data.splits import Split, batch_to_float, float_images

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "downstream_metrics",
    "embed",
    "embeddings_frame",
    "export",
    "knn_predict",
    "latent_matrix",
    "read_embeddings",
]

log = logging.getLogger(__name__)

# Logistic regression on 54000 x 784 pixels takes minutes on two cores; a seeded subsample of
# this many training rows keeps the pixel baseline to seconds while staying a fair baseline.
PIXEL_PROBE_MAX_ROWS = 10_000
_KNN_BLOCK_ELEMENTS = 2**25  # distances held at once by knn_predict (128 MB of float32)


# ---------------------------------------------------------------------------------------------
# Maths


@torch.no_grad()
def knn_predict(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int
) -> torch.Tensor:
    """Majority vote of the k nearest (Euclidean) training rows; ties go to the smaller label.

    train_x (N, F), train_y (N,) int64 >= 0, test_x (M, F) -> predictions (M,) int64.
    Distances are computed block by block as |a|^2 - 2 a.b + |b|^2 (one matmul per block), so
    memory stays bounded for 54000 x 10000 pairs. Runs on ``train_x``'s device.
    """
    k = min(k, train_x.shape[0])
    train_x = train_x.float()
    test_x = test_x.float().to(train_x.device)
    train_y = train_y.to(train_x.device)
    n_classes = int(train_y.max()) + 1
    train_sq = train_x.pow(2).sum(1)  # (N,)
    rows = max(1, _KNN_BLOCK_ELEMENTS // max(1, train_x.shape[0]))
    preds = []
    for i in range(0, test_x.shape[0], rows):
        x = test_x[i : i + rows]  # (B, F)
        # |x|^2 is the same for every training row, so it cannot change the ranking: skip it.
        d = train_sq.unsqueeze(0) - 2.0 * (x @ train_x.T)  # (B, N)
        idx = d.topk(k, dim=1, largest=False).indices  # (B, k)
        votes = torch.nn.functional.one_hot(train_y[idx], n_classes).sum(1)  # (B, n_classes)
        preds.append(votes.argmax(1))  # argmax returns the first maximum: the smaller label
    return torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.long)


def _linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    max_iter: int,
) -> float:
    """Accuracy of multinomial logistic regression on features standardised with train stats."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, ytr = train_x.float().cpu().numpy(), train_y.cpu().numpy()
    xte, yte = test_x.float().cpu().numpy(), test_y.cpu().numpy()
    if len(set(ytr.tolist())) < 2:  # one class: any classifier predicts it
        return float((yte == ytr[0]).mean())
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(xtr, ytr)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning(
            "linear probe did not converge in %d iterations (export.probe_max_iter)", max_iter
        )
    return float(clf.score(xte, yte))


def downstream_metrics(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    cfg: ExportConfig,
    probe_max_rows: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Linear-probe and kNN test accuracy of features trained on ``train``.

    train_x (N, F), train_y (N,), test_x (M, F), test_y (M,). Rows with a label < 0 are
    skipped. ``probe_max_rows`` caps the probe's training rows with a subsample seeded by
    ``seed`` (kNN always uses every labelled row). Returns ``linear_probe_accuracy``,
    ``knn_accuracy`` (None without labelled train and test rows), the seconds each took and the
    rows each used.
    """
    train_y, test_y = train_y.to(train_x.device), test_y.to(test_x.device)
    keep_tr, keep_te = train_y >= 0, test_y >= 0
    train_x, train_y = train_x[keep_tr], train_y[keep_tr].long()
    test_x, test_y = test_x[keep_te], test_y[keep_te].long()
    n_train, n_test = train_x.shape[0], test_x.shape[0]
    probe_rows = n_train if probe_max_rows is None else min(n_train, probe_max_rows)
    out: dict[str, Any] = {
        "linear_probe_accuracy": None,
        "knn_accuracy": None,
        "linear_probe_seconds": 0.0,
        "knn_seconds": 0.0,
        "linear_probe_train_rows": probe_rows if n_test else 0,
        "knn_train_rows": n_train if n_test else 0,
        "test_rows": n_test if n_train else 0,
    }
    if n_train == 0 or n_test == 0:
        return out

    t0 = time.perf_counter()
    if probe_rows < n_train:
        gen = torch.Generator().manual_seed(seed)
        sub = torch.randperm(n_train, generator=gen)[:probe_rows].sort().values
        sub = sub.to(train_x.device)
        px, py = train_x[sub], train_y[sub]
    else:
        px, py = train_x, train_y
    out["linear_probe_accuracy"] = _linear_probe(px, py, test_x, test_y, cfg.probe_max_iter)
    out["linear_probe_seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pred = knn_predict(train_x, train_y, test_x, cfg.knn_k)
    out["knn_accuracy"] = int((pred == test_y.cpu()).sum()) / n_test
    out["knn_seconds"] = time.perf_counter() - t0
    return out


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
    seed: int,
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
            seed=seed,
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
                seed=seed,
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
    seed: int = 0,
    pixel_probe_max_rows: int | None = PIXEL_PROBE_MAX_ROWS,
) -> dict[str, Any]:
    """Write ``out_dir/{split}.parquet`` for every split and return the downstream metrics.

    The embedded images are the grey pixels (module docstring). Scores train on ``train`` and
    test on ``test`` (None when either is missing or unlabelled): on the embeddings (mu) and, as
    the baselines, on the pixels the model sees (``pixel_*``: for dynamic data one fixed
    binarization seeded by ``seed``) and on the grey pixels (``grey_pixel_*``), whose linear
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
            seen = x if binarize == "none" else float_images(split, binarize, seed)
            pixels[name] = seen.flatten(1)
        t0 = time.perf_counter()
        frame = embeddings_frame(name, split.labels, mus[name], logvar)
        atomic_write_with(
            out_dir / f"{name}.parquet", lambda p, f=frame: f.to_parquet(p, index=False)
        )
        write_s += time.perf_counter() - t0
        rows[f"rows_{name}"] = len(split)

    latent, pixel, grey_scores = _scores(
        splits, mus, pixels, grey, binarize, cfg, pixel_probe_max_rows, seed
    )
    metrics = {
        "linear_probe_accuracy": latent["linear_probe_accuracy"],
        "knn_accuracy": latent["knn_accuracy"],
        "pixel_linear_probe_accuracy": pixel["linear_probe_accuracy"],
        "pixel_knn_accuracy": pixel["knn_accuracy"],
        "grey_pixel_linear_probe_accuracy": grey_scores["linear_probe_accuracy"],
        "grey_pixel_knn_accuracy": grey_scores["knn_accuracy"],
        "knn_k": cfg.knn_k,
        "latent_dim": model.latent_dim,
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
