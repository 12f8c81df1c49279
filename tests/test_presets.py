"""Presets: named params overrides, printed as dvc exp run flags and checked before use."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from vae.cli import main
from vae.config import ConfigError
from vae.params import load_params
from vae.presets import apply_preset, dvc_flags, load_presets


def _parse_flags(flags: str) -> dict[str, object]:
    words = shlex.split(flags)
    assert words[::2] == ["-S"] * (len(words) // 2)
    return {k: yaml.safe_load(v) for k, v in (w.split("=", 1) for w in words[1::2])}


def test_every_shipped_preset_is_valid_and_round_trips() -> None:
    presets = load_presets(REPO / "presets.yaml")
    assert "quality" in presets
    base = load_params(REPO / "params.yaml").to_dict()
    for name, overrides in presets.items():
        flags = dvc_flags(name, REPO / "presets.yaml", REPO / "params.yaml")
        assert _parse_flags(flags) == overrides, name  # DVC reads -S values back as YAML
        applied = apply_preset(base, overrides)
        for key, value in overrides.items():
            section, field = key.split(".")
            assert applied[section][field] == value


def test_a_bad_preset_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "p.yaml").write_text("fast:\n  train.epoch: 3\n")
    with pytest.raises(ConfigError, match=r"preset 'fast': train\.epoch: unknown key"):
        dvc_flags("fast", tmp_path / "p.yaml", REPO / "params.yaml")
    (tmp_path / "q.yaml").write_text("fast:\n  train.lr: -1\n")
    args = ["--params", str(REPO / "params.yaml"), "preset", "fast"]
    assert main([*args, "--presets", str(tmp_path / "q.yaml")]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--presets", str(tmp_path / "p.yaml")]) == 2
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        dvc_flags("nope", REPO / "presets.yaml", REPO / "params.yaml")
    (tmp_path / "r.yaml").write_text("odd:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"not a section\.key"):
        load_presets(tmp_path / "r.yaml")


def test_the_cli_prints_flags_and_lists_presets(capsys: pytest.CaptureFixture) -> None:
    common = ["--params", str(REPO / "params.yaml"), "preset"]
    presets = ["--presets", str(REPO / "presets.yaml")]
    assert main([*common, "quality", *presets]) == 0
    flags = capsys.readouterr().out.strip()
    assert _parse_flags(flags) == load_presets(REPO / "presets.yaml")["quality"]
    assert main([*common, *presets]) == 0
    assert capsys.readouterr().out.startswith("quality: -S ")


def test_the_conv_hvae_preset_takes_a_training_step_on_the_cpu() -> None:
    """The full-size ConvHVAE (gated convolutions, two layers, 500 pseudo-inputs): one Adam step
    on 8 binary images, a finite loss, and a gradient in every parameter."""
    import torch

    from vae.core.losses import negative_elbo
    from vae.core.model import VAE
    from vae.params import parse_params

    base = load_params(REPO / "params.yaml").to_dict()
    cfg = parse_params(apply_preset(base, load_presets(REPO / "presets.yaml")["conv-hvae"]))
    assert (cfg.model.arch, cfg.model.latent_layers) == ("gated_conv", 2)
    torch.manual_seed(0)
    model = VAE(cfg.model, (1, 28, 28))
    x = torch.bernoulli(torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    terms = negative_elbo(x, model(x, generator=torch.Generator().manual_seed(1)), kl_weight=0.5)
    assert torch.isfinite(torch.stack(terms)).all()
    terms.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
