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
    from tests.conftest import write_params

    # its own tiny data, not Debian's package: a machine without it runs this test too
    write_params(project / "params.yaml", data={"source": str(project / "data" / "raw")})
    assert main(["ingest", "--check"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ")
    assert all(stamp.match(line) for line in lines), lines


def test_stage_commands_run_the_code_of_their_own_copy(tmp_path: Path) -> None:
    """A --temp or queued `dvc exp run` runs each stage in a copy of the project. The stage must
    import that copy's vae/ (the code its dvc.lock hashes), not the editable install's, which
    points at the workspace and may have changed since the experiment started."""
    import shutil
    import subprocess

    import yaml

    from tests.conftest import REPO, subprocess_env

    copy = tmp_path / "copy"
    shutil.copytree(REPO / "vae", copy / "vae", ignore=shutil.ignore_patterns("__pycache__"))
    marker = tmp_path / "imported_from"
    mark = "import os as _o\n_o.environ.get('VAE_MARK') and open(_o.environ['VAE_MARK'], 'w')"
    with (copy / "vae" / "__init__.py").open("a") as f:
        f.write(f"\n{mark}.write(__file__)\n")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        marker.unlink(missing_ok=True)
        done = subprocess.run(
            f"{stage['cmd']} --help",
            shell=True,
            cwd=copy,
            env=subprocess_env(VAE_MARK=str(marker)),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert marker.is_file(), f"{name}: `{stage['cmd']}` imported vae/ from {vae.__file__}"
        assert Path(marker.read_text()) == copy / "vae" / "__init__.py", name
