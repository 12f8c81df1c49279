"""What the register stage does with a trained model: register it behind the gate, or, for a
DVC experiment, only log it into its run.

:func:`publish` returns the decision that ``metrics/registry.json`` holds. The gate itself, and
re-scoring a champion evaluated on other data, are :func:`vae.mlops.registry.register`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vae.config import Config
from vae.core.model import VAE

__all__ = ["not_registered", "publish"]

log = logging.getLogger("vae")


def publish(
    cfg: Config, model: VAE, run_id: str, manifest: dict, data: Path, metrics: Path
) -> dict:
    """Register ``model`` (from run ``run_id``), or log it only inside a DVC experiment."""
    from vae.mlops.lineage import experiment_name

    exp = experiment_name()
    if exp and not cfg.mlflow.register_experiments:
        return _log_only(model, cfg.mlflow.registered_model, run_id, exp)
    return _register(cfg, model, run_id, manifest, data, metrics)


def not_registered(name: str, reason: str, **extra: object) -> dict:
    return {
        "name": name,
        "registered": False,
        "version": None,
        "promoted": False,
        "reason": reason,
        **extra,
    }


def _log_only(model: VAE, name: str, run_id: str, exp: str) -> dict:
    """An experiment's model: logged into its run, registered only on request."""
    from vae.mlops.packaging import log_model

    model_uri = log_model(model.cpu(), run_id)
    reason = (
        f"DVC experiment {exp!r}: experiments register no version unless "
        "mlflow.register_experiments is true; the model is logged to its run"
    )
    log.info("%s; register it with mlflow.register_model(%r, %r)", reason, model_uri, name)
    return not_registered(name, reason, run_id=run_id, model_uri=model_uri)


def _register(
    cfg: Config, model: VAE, run_id: str, manifest: dict, data: Path, metrics: Path
) -> dict:
    from vae.atomic import load_json
    from vae.data.splits import float_images, load_split
    from vae.evaluation.evaluate import evaluate
    from vae.mlops.lineage import run_tags
    from vae.mlops.registry import register

    name = cfg.mlflow.registered_model
    eval_path = metrics / "eval.json"
    eval_metrics = load_json(eval_path) if eval_path.is_file() else None
    eval_key = {
        "dataset_sha256": manifest["dataset_sha256"],
        "binarize": cfg.data.binarize,
        "iw_samples": str(cfg.evaluate.iw_samples),
        "evaluate_seed": str(cfg.evaluate.seed),
    }
    if cfg.evaluate.max_images:  # only then, so champions tagged before it existed still match
        eval_key["max_images"] = str(cfg.evaluate.max_images)

    device = next(model.parameters()).device

    def reevaluate(champion: VAE) -> float:
        test = load_split(data / "test.pt", device)
        x = float_images(test, cfg.data.binarize, cfg.evaluate.seed)
        return evaluate(champion.to(device), x, cfg.evaluate)["nll_iw"]

    decision = register(model.cpu(), name, run_id, eval_metrics, eval_key, reevaluate, run_tags())
    log.info(
        "registered %s v%d; %s: %s",
        name,
        decision["version"],
        "promoted to champion" if decision["promoted"] else "champion unchanged",
        decision["reason"],
    )
    return decision
