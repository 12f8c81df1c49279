"""How useful features are downstream: a linear probe and a k-nearest-neighbour vote.

Both classifiers are trained on the train split's features and scored on the test split's:
multinomial logistic regression on features standardised with the train statistics
(scikit-learn), and a majority vote of the k nearest training rows (torch, block by block).
:mod:`vae.evaluation.export` scores the embeddings and the pixel baselines with them.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import torch

from vae.config import ExportConfig

__all__ = ["downstream_metrics", "knn_predict"]

log = logging.getLogger(__name__)
_KNN_BLOCK_ELEMENTS = 2**25  # distances held at once by knn_predict (128 MB of float32)


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
) -> dict[str, Any]:
    """Linear-probe and kNN test accuracy of features trained on ``train``.

    train_x (N, F), train_y (N,), test_x (M, F), test_y (M,). Rows with a label < 0 are
    skipped. ``probe_max_rows`` caps the probe's training rows with a subsample seeded by
    ``cfg.seed`` (kNN always uses every labelled row). Returns ``linear_probe_accuracy``,
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
        gen = torch.Generator().manual_seed(cfg.seed)
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
