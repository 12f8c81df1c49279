"""A tracking server's refusals and failures as one line of ours, with the right exit code."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from vae.errors import exit_code
from vae.mlops.store import NotAllowed, TrackingUnavailable, one_line_errors

URI = "http://writer:hunter2hunter2@mlflow.example:5000"


def _raise(name: str) -> None:
    with one_line_errors(URI, "registering m"):
        raise MlflowException("API request failed", error_code=getattr(databricks_pb2, name))


def test_not_authenticated_names_the_variables_and_hides_the_password() -> None:
    with pytest.raises(NotAllowed) as info:
        _raise("UNAUTHENTICATED")
    message = str(info.value)
    assert "not authenticated" in message and "MLFLOW_TRACKING_USERNAME" in message
    assert "hunter2" not in message and exit_code(info.value) == 1


def test_permission_denied_names_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    with pytest.raises(NotAllowed, match="denies reader permission"):
        _raise("PERMISSION_DENIED")


def test_a_server_failure_is_retryable() -> None:
    with pytest.raises(TrackingUnavailable) as info:
        _raise("INTERNAL_ERROR")  # 500: a database restarting behind the server, say
    assert exit_code(info.value) == 75 and "try again" in str(info.value)


def test_anything_else_goes_on_as_mlflow_raised_it() -> None:
    with pytest.raises(MlflowException) as info:
        _raise("RESOURCE_DOES_NOT_EXIST")
    assert not isinstance(info.value, NotAllowed | TrackingUnavailable)
