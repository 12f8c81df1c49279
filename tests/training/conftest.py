"""The training tests' shared set-up: the tiny project's prepared splits, and its params with
``train`` overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from vae.cli import main
from vae.config import Config
from vae.data.splits import Split, load_split
from vae.params import load_params, parse_params


@pytest.fixture
def prepared(project: Path) -> Path:
    """``data/prepared`` of the tiny project (the cwd), made by ``vae prepare``."""
    assert main(["-q", "prepare"]) == 0
    return project / "data" / "prepared"


def prepared_splits(prepared: Path) -> tuple[Split, Split]:
    """The train and validation splits of ``prepared``."""
    return load_split(prepared / "train.pt"), load_split(prepared / "val.pt")


def train_cfg(**train: object) -> Config:
    """The cwd's params.yaml with ``train`` overrides, parsed."""
    base = load_params("params.yaml").to_dict()
    base["train"].update(train)
    return parse_params(base)
