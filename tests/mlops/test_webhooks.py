"""The champion webhook's receiver side, against a signature computed here the way MLflow's
delivery code does (``v1,`` + base64 HMAC-SHA256 of ``"<id>.<timestamp>.<body>"``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest

from vae.cli import main
from vae.mlops.webhooks import champion_event, verify_signature

SECRET = "the-receivers-secret"


def _delivery(data: dict, secret: str = SECRET, stamp: int | None = None) -> tuple[dict, bytes]:
    body = json.dumps(
        {"entity": "model_version_alias", "action": "created", "timestamp": "t", "data": data}
    ).encode()
    stamp = int(time.time()) if stamp is None else stamp
    signed = f"d-1.{stamp}.{body.decode()}".encode()
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    headers = {
        "X-MLflow-Delivery-Id": "d-1",
        "X-MLflow-Timestamp": str(stamp),
        "X-MLflow-Signature": "v1," + base64.b64encode(digest).decode(),
    }
    return headers, body


def test_a_champion_move_is_reported() -> None:
    headers, body = _delivery({"name": "m", "alias": "champion", "version": "7"})
    assert champion_event(SECRET, headers, body) == {"name": "m", "version": "7"}
    assert champion_event(SECRET, headers, body, model="m") == {"name": "m", "version": "7"}
    assert champion_event(SECRET, headers, body, model="other") is None


def test_another_alias_is_not_a_champion_move() -> None:
    headers, body = _delivery({"name": "m", "alias": "challenger", "version": "8"})
    assert champion_event(SECRET, headers, body) is None


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b.replace(b"challenger", b"champion")),  # the body changed
        lambda h, b: ({**h, "X-MLflow-Timestamp": str(int(h["X-MLflow-Timestamp"]) + 1)}, b),
        lambda h, b: ({k: v for k, v in h.items() if k != "X-MLflow-Signature"}, b),
        lambda h, b: ({**h, "X-MLflow-Signature": "v0," + h["X-MLflow-Signature"][3:]}, b),
    ],
)
def test_a_tampered_or_unsigned_delivery_is_refused(tamper) -> None:
    headers, body = tamper(*_delivery({"name": "m", "alias": "challenger", "version": "8"}))
    with pytest.raises(ValueError, match="Signature"):
        champion_event(SECRET, headers, body)


def test_the_wrong_secret_and_an_old_delivery_do_not_verify() -> None:
    headers, body = _delivery({"name": "m", "alias": "champion", "version": "1"}, "other")
    assert not verify_signature(SECRET, headers, body)
    headers, body = _delivery({"name": "m", "alias": "champion", "version": "1"}, stamp=1000)
    assert not verify_signature(SECRET, headers, body)  # a replay from 1970
    assert verify_signature(SECRET, headers, body, now=1000 + 60)
    lower = {k.lower(): v for k, v in headers.items()}  # header names are case-insensitive
    assert verify_signature(SECRET, lower, body, now=1000)


def test_the_command_without_url_or_secret_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("VAE_CHAMPION_WEBHOOK_URL", raising=False)
    monkeypatch.delenv("VAE_CHAMPION_WEBHOOK_SECRET", raising=False)
    assert main(["champion-webhook"]) == 2
    assert capsys.readouterr().err.strip().endswith("set VAE_CHAMPION_WEBHOOK_URL")
    assert main(["champion-webhook", "--url", "https://hooks.example.com/vae"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "VAE_CHAMPION_WEBHOOK_SECRET" in err[0]
