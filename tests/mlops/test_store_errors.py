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


class _FailingClient:
    def __init__(self, code: str) -> None:
        self.code = code

    def get_run(self, run_id: str) -> None:
        raise MlflowException("API request failed", error_code=getattr(databricks_pb2, self.code))


@pytest.mark.parametrize(
    ("code", "expected"), [("INTERNAL_ERROR", 75), ("RESOURCE_DOES_NOT_EXIST", 1)]
)
def test_a_stage_reading_its_run_from_a_failing_server_exits_75_or_names_the_missing_run(
    code: str, expected: int, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The register stage's first call (PostgreSQL restarting behind the server answers 503):
    one line and exit 75, not a traceback; a run the server lacks is RunNotFound (exit 1)."""
    from vae.atomic import atomic_write_json
    from vae.mlops import pipeline_run, store

    monkeypatch.setattr(pipeline_run, "tracking_uri", lambda: URI)
    monkeypatch.setattr(pipeline_run, "check_reachable", lambda uri: None)
    monkeypatch.setattr(store, "client", lambda uri=None: _FailingClient(code))
    run_file = tmp_path / "mlflow_run.json"
    atomic_write_json(run_file, {"run_id": "abc", "tracking_uri": "http://elsewhere"})
    with pytest.raises(TrackingUnavailable if expected == 75 else pipeline_run.RunNotFound) as e:
        pipeline_run.tracker_from_run_file(run_file)
    assert exit_code(e.value) == expected and "hunter2" not in str(e.value)
