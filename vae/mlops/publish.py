"""What the register stage does with a trained model: register it behind the gate, or, for a
DVC experiment, only log it into its run.

:func:`publish` returns the decision that ``metrics/registry.json`` holds. The gate itself, and
re-scoring a champion evaluated on other data, are :func:`vae.mlops.registry.register`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from vae.config import Config
from vae.core.model import VAE

__all__ = ["not_registered", "publish"]

log = logging.getLogger("vae")


def publish(
    cfg: Config,
    model: VAE,
    run_id: str,
    manifest: dict,
    data: Path,
    folders: Mapping[str, Path],
    model_id: str | None = None,
) -> dict:
    """Register ``model`` (from run ``run_id``, into its logged model ``model_id``) with its
    model card, or log it only inside a DVC experiment. Its input example is the first test
    image; ``folders`` are the pipeline's ``metrics``, ``reports`` and ``plots``."""
    from vae.mlops.lineage import experiment_name

    logged = {"model_id": model_id, "example": first_image(data / "test.pt")}
    exp = experiment_name()
    if exp and not cfg.mlflow.register_experiments:
        return _log_only(model, cfg.mlflow.registered_model, run_id, exp, logged)
    decision = _register(cfg, model, run_id, manifest, data, folders["metrics"], logged)
    return {**decision, **publish_card(cfg, model, decision, folders, manifest)}


def publish_card(
    cfg: Config, model: VAE, decision: dict, folders: Mapping[str, Path], manifest: dict
) -> dict:
    """Log the version's model card into its run (``card/model_card_vN.html``) and link it from
    the version's description. A card that cannot be built is a warning, not a failure: the
    version is registered by then. Returns ``{"card": path or None}``."""
    import tempfile

    from vae.mlops import store
    from vae.mlops.card import card_facts, render_card
    from vae.mlops.lineage import data_hashes

    name, version, client = decision["name"], decision["version"], store.client()
    path = f"card/model_card_v{version}.html"
    try:
        facts = card_facts(
            model,
            decision,
            folders,
            manifest,
            data_hashes(),
            cfg.data.source,
            _compared(client, name, version, decision.get("previous_champion_version")),
        )
        with tempfile.TemporaryDirectory() as tmp:
            page = Path(tmp) / Path(path).name
            page.write_text(render_card(facts), encoding="utf-8")
            client.log_artifact(decision["run_id"], str(page), "card")
        run = client.get_run(decision["run_id"])
        link = store.artifact_page(run.info.experiment_id, decision["run_id"], path)
        mv = client.get_model_version(name, str(version))
        text = f"**Model card:** [{path}]({link}), an artifact of the source run.\n\n"
        client.update_model_version(name, str(version), description=text + mv.description)
    except Exception as exc:  # noqa: BLE001 - the version stands; say what is missing
        log.warning("%s v%s: no model card (%s: %s)", name, version, type(exc).__name__, exc)
        return {"card": None}
    log.info("%s v%s: model card %s (%s)", name, version, path, link)
    return {"card": path}


def _compared(client: object, name: str, version: int, champion: int | None) -> dict:
    """The versions the card compares with, by column label: the champion this one was gated
    against, and the version before this one; their tags hold their metrics."""
    wanted = {}
    if champion is not None and champion != version:
        wanted[f"champion before (v{champion})"] = champion
    if version > 1 and version - 1 != champion:
        wanted[f"previous (v{version - 1})"] = version - 1
    found = {}
    for label, v in wanted.items():
        try:
            found[label] = dict(client.get_model_version(name, str(v)).tags)
        except Exception:  # noqa: BLE001 - deleted: the card shows what is there
            continue
    return found


def first_image(split: Path) -> np.ndarray:
    """The split's first image as the model's input: (1, C*H*W) float32 in [0, 1]."""
    from vae.data.splits import load_split

    image = load_split(split).images[:1].float() / 255.0
    return image.reshape(1, -1).numpy()


def not_registered(name: str, reason: str, **extra: object) -> dict:
    return {
        "name": name,
        "registered": False,
        "version": None,
        "promoted": False,
        "reason": reason,
        **extra,
    }


def _log_only(model: VAE, name: str, run_id: str, exp: str, logged: dict) -> dict:
    """An experiment's model: logged into its run, registered only on request."""
    from vae.mlops.packaging import log_model

    model_uri = log_model(model.cpu(), run_id, **logged)
    reason = (
        f"DVC experiment {exp!r}: experiments register no version unless "
        "mlflow.register_experiments is true; the model is logged to its run"
    )
    log.info("%s; register it with mlflow.register_model(%r, %r)", reason, model_uri, name)
    return not_registered(name, reason, run_id=run_id, model_uri=model_uri)


def _register(
    cfg: Config, model: VAE, run_id: str, manifest: dict, data: Path, metrics: Path, logged: dict
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

    from vae.mlops.card import card_tags

    tags = {**run_tags(), **card_tags(metrics)}  # the card's sample metrics, to compare later
    decision = register(
        model.cpu(), name, run_id, eval_metrics, eval_key, reevaluate, tags, **logged
    )
    log.info(
        "registered %s v%d; %s: %s",
        name,
        decision["version"],
        "promoted to champion" if decision["promoted"] else "champion unchanged",
        decision["reason"],
    )
    return decision
