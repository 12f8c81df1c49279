"""Tell people when the champion moves: an MLflow webhook, and how its receiver checks a call.

MLflow has no "alias moved" event: ``model_version_alias.created`` fires whenever any alias is
set (``challenger`` on every registration, too), so :func:`champion_event` keeps only
``alias == "champion"``. Deliveries come from the tracking server (``mlflow server`` on a SQL
store) signed with the webhook's secret: ``X-MLflow-Signature: v1,<base64 HMAC-SHA256>`` of
``"<delivery id>.<timestamp>.<body>"``; a receiver verifies that before it believes a call.

The URL comes from ``--url`` or ``VAE_CHAMPION_WEBHOOK_URL``, the secret from
``VAE_CHAMPION_WEBHOOK_SECRET`` only (never params). Creating a webhook is an admin call.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping
from typing import Any

from vae.errors import UsageError
from vae.mlops import store

__all__ = [
    "EVENT",
    "WEBHOOK_NAME",
    "WebhookError",
    "champion_event",
    "ensure_champion_webhook",
    "verify_signature",
]

EVENT = "model_version_alias.created"
WEBHOOK_NAME = "vae-champion-moved"
MAX_AGE_SECONDS = 300  # a delivery older than this is refused as a replay


class WebhookError(UsageError, ValueError):
    """No URL or secret to create the webhook with (exit 2)."""


def ensure_champion_webhook(
    url: str | None = None, secret: str | None = None, name: str = WEBHOOK_NAME
) -> dict[str, Any]:
    """Create webhook ``name`` on alias events, or update it to this URL and secret.

    Idempotent: run it again and there is still one webhook of that name. Returns its id, URL
    and whether it was created.
    """
    url = url or os.environ.get("VAE_CHAMPION_WEBHOOK_URL")
    secret = secret or os.environ.get("VAE_CHAMPION_WEBHOOK_SECRET")
    if not url:
        raise WebhookError("no webhook URL: pass --url or set VAE_CHAMPION_WEBHOOK_URL")
    if not secret:
        raise WebhookError("no webhook secret: set VAE_CHAMPION_WEBHOOK_SECRET")
    uri = store.tracking_uri()
    client = store.client(uri)
    with store.one_line_errors(uri, f"webhook {name}"):
        existing = [w for w in _all_webhooks(client) if w.name == name]
        for extra in existing[1:]:  # two of one name (a race of two creators): keep the first
            client.delete_webhook(extra.webhook_id)
        if existing:
            hook = client.update_webhook(
                existing[0].webhook_id, url=url, events=[EVENT], secret=secret, status="ACTIVE"
            )
        else:
            description = "the champion alias moved: receivers keep alias == 'champion'"
            hook = client.create_webhook(name, url, [EVENT], description=description, secret=secret)
    return {"webhook_id": hook.webhook_id, "url": url, "created": not existing, "name": name}


def _all_webhooks(client: Any) -> list[Any]:
    found, token = [], None
    while True:
        page = client.list_webhooks(page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def verify_signature(
    secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None
) -> bool:
    """True if ``body`` was signed with ``secret`` by MLflow, recently (``MAX_AGE_SECONDS``)."""
    lower = {k.lower(): v for k, v in headers.items()}
    delivery = lower.get("x-mlflow-delivery-id", "")
    stamp = lower.get("x-mlflow-timestamp", "")
    signature = lower.get("x-mlflow-signature", "")
    if not (delivery and stamp.isdigit() and signature.startswith("v1,")):
        return False
    if abs((now or time.time()) - int(stamp)) > MAX_AGE_SECONDS:
        return False
    signed = f"{delivery}.{stamp}.{body.decode('utf-8')}".encode()
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest())
    return hmac.compare_digest(expected.decode(), signature.removeprefix("v1,"))


def champion_event(
    secret: str, headers: Mapping[str, str], body: bytes, model: str | None = None
) -> dict[str, str] | None:
    """``{"name", "version"}`` if this delivery says the champion of ``model`` moved, else None.

    Raises :class:`ValueError` for a delivery whose signature does not verify.
    """
    if not verify_signature(secret, headers, body):
        raise ValueError("webhook delivery: bad or missing X-MLflow-Signature")
    event = json.loads(body)
    data = event.get("data", {})
    if f"{event.get('entity')}.{event.get('action')}" != EVENT or data.get("alias") != "champion":
        return None
    if model is not None and data.get("name") != model:
        return None
    return {"name": data["name"], "version": str(data["version"])}
