"""The MLflow model registry: register the trained VAE, gate the ``champion`` alias, load it.

``register`` logs the model into the pipeline's run as a self-contained pyfunc
(:mod:`vae.mlops.packaging`: the :mod:`vae.pyfunc` loader module and its code, over a safetensors
file, so nothing is unpickled on load), registers a new version, gives
it the alias ``challenger`` and tags with its test metrics and dataset hash, and moves
``champion`` to it only if there is no champion yet or the new version's ``nll_iw`` on the same
test data is lower. A version whose evaluation is missing or not finite is never promoted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vae.core.model import VAE
from vae.errors import PermanentError, RetryableError
from vae.mlops import store
from vae.mlops.packaging import describe_registered_model, describe_version, log_model
from vae.pyfunc import load_vae_dir

__all__ = [
    "ChampionMoved",
    "RegistryError",
    "decide_promotion",
    "load_vae",
    "register",
    "reregister",
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


class RegistryError(PermanentError, RuntimeError):
    """A registry problem (unknown model, alias or URI), in one line."""


class ChampionMoved(RetryableError, RuntimeError):
    """Another registration moved the champion while this one decided (retryable)."""


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


def _champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


REGISTER_LOCK_TIMEOUT = 1800.0  # seconds: longer than any registration with a re-scored champion


def register(
    model: VAE,
    name: str,
    run_id: str,
    eval_metrics: dict[str, Any] | None,
    eval_key: dict[str, str],
    reevaluate: Callable[[VAE], float],
    tags: dict[str, str] | None = None,
    model_id: str | None = None,
    example: Any = None,
) -> dict[str, Any]:
    """Register ``model`` from run ``run_id`` and apply the promotion gate.

    ``eval_key`` identifies the test data and the estimator (dataset hash, K, seed): a
    champion's tagged ``nll_iw`` is compared only if its key is the same, otherwise the champion
    is re-scored on this test data with ``reevaluate(champion_model) -> nll_iw``. ``tags`` go
    on the new version too (DVC's data hashes, the DVC experiment).

    Registering, reading the champion and moving the aliases happen under the registry lock of
    the store and model (:func:`vae.locks.registry_lock`: across machines when a Prefect API is
    configured), so two processes never both read the same champion and both move it. The model
    is logged (its artifacts uploaded) before it is registered, so no alias ever points to a
    version without its files.
    """
    from vae.locks import registry_lock

    uri = store.tracking_uri()
    with store.one_line_errors(uri, f"registering {name}"):
        model_uri = log_model(model, run_id, model_id, example)
        with registry_lock(uri, name, REGISTER_LOCK_TIMEOUT):
            return _register_and_gate(
                model, model_uri, name, run_id, eval_metrics, eval_key, reevaluate, tags
            )


def _register_and_gate(
    model: VAE,
    model_uri: str,
    name: str,
    run_id: str,
    eval_metrics: dict[str, Any] | None,
    eval_key: dict[str, str],
    reevaluate: Callable[[VAE], float],
    tags: dict[str, str] | None,
) -> dict[str, Any]:
    client = store.client()
    version = _new_version(client, model, model_uri, name, run_id, eval_metrics)
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
        _move_champion(client, name, version, champion_version, run_id)
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


def _move_champion(client: Any, name: str, version: str, replaced: str | None, run_id: str) -> None:
    """Point ``champion`` at ``version``, recording on it which version it replaced and when.

    The champion is read once more first: if it is no longer ``replaced``, another registration
    moved it without holding the lock (a machine with no Prefect API), and this one stops
    rather than overwrite a decision it did not see.
    """
    from datetime import UTC, datetime

    now = _champion(client, name)
    if (now.version if now else None) != replaced:
        raise ChampionMoved(
            f"{name}: champion moved to v{now.version if now else '-'} while v{version} was "
            f"being registered (was v{replaced or '-'}); register again"
        )
    client.set_model_version_tag(name, version, "champion_replaced", replaced or "none")
    client.set_model_version_tag(name, version, "champion_from_run", run_id)
    client.set_model_version_tag(
        name, version, "champion_since", datetime.now(UTC).isoformat(timespec="milliseconds")
    )
    client.set_registered_model_alias(name, "champion", version)


def _new_version(
    client: Any,
    model: VAE,
    model_uri: str,
    name: str,
    run_id: str,
    metrics: dict[str, Any] | None,
) -> str:
    """Register ``model_uri`` as a new version of ``name`` that describes itself in the UI."""
    import mlflow

    from vae.mlops.packaging import usage_snippet

    version = str(mlflow.register_model(model_uri, name).version)
    text, tags = describe_registered_model(name, model)
    client.update_registered_model(name, description=text)
    for key, value in tags.items():
        client.set_registered_model_tag(name, key, value)
    uri = f"models:/{name}/{version}"
    client.update_model_version(
        name, version, description=describe_version(model, uri, run_id, metrics)
    )
    client.set_model_version_tag(name, version, "usage", usage_snippet(uri, model.image_shape))
    client.set_model_version_tag(name, version, "source_run", run_id)
    return version


def reregister(model_uri: str) -> dict[str, Any]:
    """Register an existing version's weights again, as a self-contained model.

    For versions logged before the model shipped its code: loading those outside this package
    fails inside MLflow's import. The new version is logged into the old one's source run, gets
    its tags (``reregistered_from`` says which version it came from) and takes over its
    aliases, ``champion`` included: same weights, same scores. The old version stays.
    """
    from vae.locks import registry_lock

    client = store.client()
    old = _resolve_version(client, model_uri)
    model = load_vae(f"models:/{old.name}/{old.version}")
    new_uri = log_model(model, old.run_id)
    with registry_lock(store.tracking_uri(), old.name, REGISTER_LOCK_TIMEOUT):
        metrics = {k: old.tags[k] for k in TAGGED_METRICS if k in old.tags}
        version = _new_version(client, model, new_uri, old.name, old.run_id, metrics)
        kept = {"usage", "source_run"}
        for key, value in old.tags.items():
            if key not in kept:
                client.set_model_version_tag(old.name, version, key, value)
        client.set_model_version_tag(old.name, version, "reregistered_from", str(old.version))
        aliases = list(client.get_model_version(old.name, old.version).aliases)
        for alias in aliases:
            client.set_registered_model_alias(old.name, alias, version)
    log.info(
        "%s v%s re-registered as v%s%s",
        old.name,
        old.version,
        version,
        f" (aliases moved: {', '.join(aliases)})" if aliases else "",
    )
    return {
        "name": old.name,
        "from_version": int(old.version),
        "version": int(version),
        "aliases": aliases,
        "model_uri": new_uri,
    }


def _resolve_version(client: Any, model_uri: str) -> Any:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` as a registry ModelVersion."""
    from mlflow.exceptions import MlflowException

    ref = model_uri.removeprefix("models:/")
    if ref == model_uri or ("@" not in ref and ref.count("/") != 1):
        raise RegistryError(f"{model_uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, version = ref.split("/", 1)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise RegistryError(f"{model_uri}: {exc.message.splitlines()[0]}") from None


def load_vae(model_uri: str, device: str = "cpu") -> VAE:
    """The registered model as a torch ``VAE``, e.g. ``load_vae("models:/name@champion")``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from vae.mlops.store import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except MlflowException as exc:
        raise RegistryError(f"{model_uri}: cannot load ({exc.message.splitlines()[0]})") from None
    data = local / "data" / "vae"
    if not data.is_dir():
        raise RegistryError(f"{model_uri}: not a model registered by this package (no data/vae)")
    return load_vae_dir(data, device)


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _int(value: Any) -> int | None:
    return None if value is None else int(value)
