"""One way to fail: every error class of vae/ and pipelines/ has one of the four bases of
vae.errors, and the exit code follows from that base alone."""

from __future__ import annotations

import importlib
import inspect

import pytest

from tests.conftest import REPO
from vae.errors import (
    EXIT_ERROR,
    EXIT_SOFTWARE,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    Bug,
    PermanentError,
    RetryableError,
    UsageError,
    VaeError,
    exit_code,
)

BASES = (PermanentError, UsageError, RetryableError, Bug)


def _project_exceptions() -> dict[str, type[BaseException]]:
    found = {}
    for path in sorted([*REPO.glob("vae/**/*.py"), *REPO.glob("pipelines/**/*.py")]):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == name
                and obj not in (*BASES, VaeError)
            ):
                found[f"{name}.{obj.__name__}"] = obj
    return found


def test_every_error_class_has_one_of_the_four_bases() -> None:
    found = _project_exceptions()
    assert len(found) >= 14, sorted(found)  # the walk found the project's classes
    assert [n for n, cls in found.items() if not issubclass(cls, BASES)] == []


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (PermanentError, EXIT_ERROR),
        (UsageError, EXIT_USAGE),
        (RetryableError, EXIT_TEMPFAIL),
        (Bug, EXIT_SOFTWARE),
        (ZeroDivisionError, EXIT_SOFTWARE),
    ],
)
def test_exit_code_follows_the_base(cls: type[BaseException], code: int) -> None:
    assert exit_code(cls("x")) == code


def test_the_codes_of_known_errors() -> None:
    from vae.config import ConfigError
    from vae.data.splits import DataError, DataUnavailable
    from vae.locks import LockTimeout
    from vae.mlops.pipeline_run import RunNotFound
    from vae.mlops.store import TrackingUnavailable

    assert exit_code(ConfigError("k")) == EXIT_USAGE
    assert exit_code(DataError("f")) == EXIT_ERROR
    # bad data and out of reach: a later retry may work, so retryable wins
    assert exit_code(DataUnavailable("f")) == EXIT_TEMPFAIL
    assert exit_code(LockTimeout("l")) == exit_code(TrackingUnavailable("u")) == EXIT_TEMPFAIL
    assert exit_code(RunNotFound("r")) == EXIT_ERROR


def test_the_cli_maps_by_base_class(
    project: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A new error class needs no entry in the CLI: its base decides the code and the line."""
    import vae.cli

    class Fresh(RetryableError):
        pass

    def failing(cfg: object, args: object) -> None:
        raise Fresh("the thing is out of reach")

    monkeypatch.setattr(vae.cli, "cmd_prepare", failing)
    assert vae.cli.main(["-q", "prepare"]) == EXIT_TEMPFAIL
    assert capsys.readouterr().err.strip() == "vae prepare: error: the thing is out of reach"
