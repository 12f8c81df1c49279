"""The command line as a user reads it: help on every flag, a version, log lines off a terminal."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

import vae
from vae.cli import build_parser, main


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_and_flag_has_help() -> None:
    parser = build_parser()
    assert not parser.description.startswith("``"), "the first line speaks to users"
    for name, sub in {"vae": parser, **_subcommands(parser)}.items():
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest}"
    for choice in _subcommands(parser).values():
        assert choice.description is None or choice.description.strip()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vae {vae.__version__}"


def test_log_lines_off_a_terminal_carry_time_and_level(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ingest", "--check"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ")
    assert all(stamp.match(line) for line in lines), lines
