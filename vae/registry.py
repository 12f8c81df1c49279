"""The MLflow model registry: register the trained VAE, gate the ``champion`` alias, load it.

``register`` logs the model into the pipeline's run as a pyfunc (the :mod:`vae.pyfunc` loader
module over a safetensors file, so nothing is unpickled on load), registers a new version, gives
it the alias ``challenger`` and tags with its test metrics and dataset hash, and moves
``champion`` to it only if there is no champion yet or the new version's ``nll_iw`` on the same
test data is lower. A version whose evaluation is missing or not finite is never promoted.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vae.model import VAE
from vae.pyfunc import DEFAULT_PARAMS, load_vae_dir, save_vae_dir

__all__ = [
    "RegistryError",
    "decide_promotion",
    "load_vae",
    "log_model",
    "pyfunc_signature",
    "register",
]

log = logging.getLogger(__name__)
TAGGED_METRICS = (
    "nll_iw",
    "elbo",
    "recon",
    "kl",
    "elbo_gap",
    "bits_per_dim",
    "active_units",
    "iw_samples",
)


class RegistryError(RuntimeError):
    """A registry problem (unknown model, alias or URI), in one line."""


def pyfunc_signature() -> Any:
    """Outputs and the ``mode``/``n``/``seed``/``sample`` params. The image input is validated by
    ``predict`` itself, which accepts (N, C*H*W) and (N, C, H, W) arrays alike."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    types = {str: "string", int: "long", bool: "boolean"}
    return ModelSignature(
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        params=ParamSchema([ParamSpec(k, types[type(v)], v) for k, v in DEFAULT_PARAMS.items()]),
    )


def decide_promotion(
    new_nll: float | None, champion_nll: float | None, champion_version: str | None
) -> tuple[bool, str]:
    """The promotion gate, as a pure function: lower ``nll_iw`` on the same test data wins."""
    if new_nll is None or not math.isfinite(new_nll):
        return False, "the new version has no finite nll_iw (evaluation missing or failed)"
    if champion_version is None:
        return True, "there was no champion yet"
    if champion_nll is None or not math.isfinite(champion_nll):
        return True, f"champion v{champion_version} has no finite nll_iw on this test data"
    if new_nll < champion_nll:
        return True, (
            f"nll_iw {new_nll:.3f} < champion v{champion_version}'s {champion_nll:.3f} nats"
        )
    return False, (
        f"nll_iw {new_nll:.3f} is not lower than champion v{champion_version}'s "
        f"{champion_nll:.3f} nats; the champion stays"
    )


def _client() -> Any:
    from mlflow.tracking import MlflowClient

    from vae.mlflow_tracker import tracking_uri

    return MlflowClient(tracking_uri=tracking_uri())


def _champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


REGISTER_LOCK_TIMEOUT = 1800.0  # seconds: longer than any registration with a re-scored champion


def log_model(model: VAE, run_id: str) -> str:
    """Log ``model`` into run ``run_id`` as a pyfunc model; returns its model URI."""
    import mlflow

    from vae.mlflow_tracker import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    with tempfile.TemporaryDirectory() as tmp:
        save_vae_dir(model, Path(tmp) / "vae")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                loader_module="vae.pyfunc",
                data_path=str(Path(tmp) / "vae"),
                signature=pyfunc_signature(),
                input_example=np.zeros((1, math.prod(model.image_shape)), dtype=np.float32),
                pip_requirements=_requirements(),
            )
    return str(info.model_uri)


def register(
    model: VAE,
    name: str,
    run_id: str,
    eval_metrics: dict[str, Any] | None,
    eval_key: dict[str, str],
    reevaluate: Callable[[VAE], float],
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Register ``model`` from run ``run_id`` and apply the promotion gate.

    ``eval_key`` identifies the test data and the estimator (dataset hash, K, seed): a
    champion's tagged ``nll_iw`` is compared only if its key is the same, otherwise the champion
    is re-scored on this test data with ``reevaluate(champion_model) -> nll_iw``. ``tags`` go
    on the new version too (DVC's data hashes, the DVC experiment).

    Registering, reading the champion and moving the aliases happen under a file lock per store
    and model (:func:`vae.locks.registry_lock_path`), so two processes (queue workers, a
    scheduled flow) never both read the same champion and both move it.
    """
    from vae.locks import file_lock, registry_lock_path
    from vae.mlflow_tracker import tracking_uri

    model_uri = log_model(model, run_id)
    uri = tracking_uri()
    with file_lock(registry_lock_path(uri, name), REGISTER_LOCK_TIMEOUT, f"registering {name}"):
        return _register_and_gate(model_uri, name, run_id, eval_metrics, eval_key, reevaluate, tags)


def _register_and_gate(
    model_uri: str,
    name: str,
    run_id: str,
    eval_metrics: dict[str, Any] | None,
    eval_key: dict[str, str],
    reevaluate: Callable[[VAE], float],
    tags: dict[str, str] | None,
) -> dict[str, Any]:
    import mlflow

    client = _client()
    version = str(mlflow.register_model(model_uri, name).version)
    new_nll = _finite(eval_metrics.get("nll_iw")) if eval_metrics else None
    all_tags = {
        k: str(eval_metrics[k]) for k in TAGGED_METRICS if eval_metrics and k in eval_metrics
    }
    all_tags.update(eval_key)
    all_tags.update(tags or {})
    all_tags["evaluated"] = str(new_nll is not None).lower()
    for key, value in all_tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, "challenger", version)

    champion = _champion(client, name)
    champion_version = champion.version if champion else None
    champion_nll = None
    if champion is not None:
        same_key = all(champion.tags.get(k) == v for k, v in eval_key.items())
        if same_key:
            champion_nll = _finite(champion.tags.get("nll_iw"))
        else:
            log.info(
                "champion v%s was evaluated on other test data or settings; re-scoring it",
                champion_version,
            )
            champion_nll = _finite(reevaluate(load_vae(f"models:/{name}/{champion_version}")))
    promoted, reason = decide_promotion(new_nll, champion_nll, champion_version)
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
    log.info(
        "%s v%s: %s (%s)",
        name,
        version,
        "promoted to champion" if promoted else "not promoted",
        reason,
    )
    return {
        "name": name,
        "registered": True,
        "version": int(version),
        "promoted": promoted,
        "reason": reason,
        "champion_version": int(version) if promoted else _int(champion_version),
        "previous_champion_version": _int(champion_version),
        "nll_iw": new_nll,
        "champion_nll_iw": champion_nll,
        "run_id": run_id,
        "model_uri": model_uri,
    }


def load_vae(model_uri: str, device: str = "cpu") -> VAE:
    """The registered model as a torch ``VAE``, e.g. ``load_vae("models:/name@champion")``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from vae.mlflow_tracker import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except MlflowException as exc:
        raise RegistryError(f"{model_uri}: cannot load ({exc.message.splitlines()[0]})") from None
    data = local / "data" / "vae"
    if not data.is_dir():
        raise RegistryError(f"{model_uri}: not a model registered by this package (no data/vae)")
    return load_vae_dir(data, device)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "numpy", "safetensors", "mlflow")]


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _int(value: Any) -> int | None:
    return None if value is None else int(value)
