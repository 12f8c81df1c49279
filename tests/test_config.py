from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_PARAMS, write_params
from vae.cli import main
from vae.config import Config, ConfigError, ModelConfig
from vae.params import load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_parse_and_match_defaults() -> None:
    cfg = load_params(REPO / "params.yaml")
    assert cfg == Config(), "params.yaml and the dataclass defaults should say the same thing"
    assert cfg.flat()["train.lr"] == pytest.approx(3e-3)


def test_config_is_frozen() -> None:
    cfg = parse_params({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_yaml12_floats_are_numbers(tmp_path: Path) -> None:
    text = (REPO / "params.yaml").read_text().replace("lr: 0.003", "lr: 1e-3")
    (tmp_path / "p.yaml").write_text(text)
    assert load_params(tmp_path / "p.yaml").train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"train": {"epochs": -1}}, ["train.epochs", "out of range", ">= 1"]),
        ({"train": {"lr_decay": 1.5}}, ["train.lr_decay", "out of range", "<= 1"]),
        ({"model": {"latent_dim": "abc"}}, ["model.latent_dim", "wrong type", "an integer"]),
        ({"model": {"latent_dim": 0}}, ["model.latent_dim", ">= 1"]),
        ({"train": {"lr": 0}}, ["train.lr", "> 0"]),
        ({"train": {"epochs": True}}, ["train.epochs", "wrong type"]),
        ({"evaluate": {"iw_samples": 0}}, ["evaluate.iw_samples", ">= 1"]),
        ({"data": {"binarize": "maybe"}}, ["data.binarize", "'dynamic', 'static', 'none'"]),
        ({"train": {"epoch": 3}}, ["train.epoch", "unknown key", "did you mean 'epochs'"]),
        ({"trian": {}}, ["trian", "unknown key", "did you mean 'train'"]),
        ({"train": {"device": "tpu"}}, ["train.device", "cuda:N"]),
        ({"model": {"likelihood": "gaussian"}}, ["model.likelihood", "data.binarize"]),
        ({"data": {"folder": "imgs"}}, ["data.folder", "renamed to data.source"]),
        ({"data": {"source": " "}}, ["data.source", "empty"]),
        ({"schedule": {"timeout_minutes": 0}}, ["schedule.timeout_minutes", "> 0"]),
        ({"mlflow": {"register_experiments": "yes"}}, ["mlflow.register_experiments", "true"]),
        ({"train": 5}, ["train", "mapping"]),
        ({"train": {"objective": "iwae", "beta": 0.5}}, ["train.objective", "train.beta"]),
        ({"train": {"objective": "iwae", "free_bits": 0.1}}, ["train.objective", "free_bits"]),
        ({"train": {"objective": "vimco"}}, ["train.objective", "'elbo', 'iwae'"]),
        ({"train": {"ema_decay": 1.0}}, ["train.ema_decay", "< 1"]),
        ({"train": {"free_bits": "some"}}, ["train.free_bits", "a number or a list of numbers"]),
        ({"train": {"objective": "iwae", "free_bits": [0.1]}}, ["train.objective", "free_bits"]),
        ({"model": {"prior": "flow"}}, ["model.prior", "'standard', 'vamp'"]),
        ({"model": {"hidden_layers": 0}}, ["model.hidden_layers", ">= 1"]),
        ({"train": {"nnodes": 0}}, ["train.nnodes", ">= 1"]),
        ({"train": {"rdzv_endpoint": "node0"}}, ["train.rdzv_endpoint", "HOST:PORT"]),
        ({"train": {"rdzv_endpoint": "a b:1"}}, ["train.rdzv_endpoint", "HOST:PORT"]),
        ({"generate": {"sampler": "prior"}}, ["generate.temperature", "1.2", "'prior'"]),
        ({"generate": {"temperature": 0}}, ["generate.temperature", "> 0"]),
        ({"generate": {"sampler": "flow"}}, ["generate.sampler", "'gmm', 'diffusion'"]),
        ({"score": {"temperatures": 0.9}}, ["score.temperatures", "a list of numbers"]),
        ({"score": {"temperatures": [0.9, -1]}}, ["score.temperatures[1]", "> 0"]),
        ({"score": {"temperatures": [0.9, "hot"]}}, ["score.temperatures[1]", "a number"]),
        ({"score": {"feature_net": "inception"}}, ["score.feature_net", "'auto', 'train'"]),
    ],
)
def test_bad_params_name_the_key(raw: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_gaussian_with_continuous_pixels_is_fine() -> None:
    cfg = parse_params({"model": {"likelihood": "gaussian"}, "data": {"binarize": "none"}})
    assert cfg.model.likelihood == "gaussian"


def test_iwae_takes_the_default_kl_warm_up() -> None:
    """The shipped warm-up anneals the iwae weights, so -S train.objective=iwae alone is valid."""
    cfg = parse_params({"train": {"objective": "iwae"}})
    assert cfg.train.objective == "iwae" and cfg.train.kl_warmup_steps > 0


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("train:\n  epochs: 3\n  lr: [0.1\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+"):
        load_params(tmp_path / "p.yaml")


def test_cli_exits_2_with_one_line_before_any_work(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_params(project / "params.yaml", train={"epochs": -1})
    assert main(["prepare"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.epochs" in err
    assert not (project / "data" / "prepared").exists(), "no work may start on bad params"


def test_saved_model_config_keeps_its_old_meaning() -> None:
    old = {"arch": "mlp", "latent_dim": 4, "hidden_dim": 32}  # written before `activation`
    assert ModelConfig.from_saved(old).activation == "relu"
    assert ModelConfig.from_saved({**old, "activation": "silu"}).activation == "silu"
    assert ModelConfig().activation == "leaky_relu"  # the default for new models
    # keys added later describe the model as it was, not today's defaults for new models
    legacy = ModelConfig.from_saved(old)
    assert (legacy.hidden_layers, legacy.prior, legacy.latent_layers) == (1, "standard", 1)
    assert ModelConfig().hidden_layers == 2


SHIPPED = (REPO / "params.yaml").read_text()
CRON = '"0 3 * * 1"'


@pytest.mark.parametrize(
    ("command", "text", "fragments"),
    [
        ("train", "", ["holds no params", "empty or only comments"]),
        ("prepare", "# nothing but a comment\n", ["holds no params"]),
        ("train", "train:\n  epochs: 3\n", ["section 'data' is missing"]),
        ("train", SHIPPED + "train:\n  epochs: 3\n", ["line ", "'train' is duplicated"]),
        ("ingest", SHIPPED.replace("epochs: 70", "epochs: 3\n  epochs: 4"), ["'epochs'"]),
        ("train", SHIPPED.replace(CRON, '"99 99 * * *"'), ["line ", "schedule.cron"]),
        ("prepare", SHIPPED.replace(CRON, '"0 0 30 2 *"'), ["never fires"]),
        ("evaluate", SHIPPED.replace("epochs: 70", "epochs: -1"), ["line ", "train.epochs"]),
        ("train", SHIPPED.replace("device: auto", "device: cuda"), ["train.device", "CUDA"]),
        ("register", SHIPPED.replace("device: auto", "device: cuda:7"), ["train.device"]),
    ],
)
def test_every_bad_params_file_exits_2_naming_the_file_and_writes_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    text: str,
    fragments: list[str],
) -> None:
    import torch

    if "cuda" in text.split("device:")[-1][:10] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    assert "epochs: 70" in SHIPPED and CRON in SHIPPED and "device: auto" in SHIPPED
    (tmp_path / "params.yaml").write_text(text)
    assert main([command]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vae: error: params.yaml"), err
    for fragment in fragments:
        assert fragment in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"], "no work may start"


def test_the_tiny_params_hold_every_param_a_stage_lists() -> None:
    """DVC refuses a stage whose params.yaml lacks a key it lists; the tiny projects of these
    tests get data.source from make_dvc_project."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    listed = {key for stage in stages.values() for key in stage.get("params", [])}
    missing = []
    for key in sorted(listed - {"data.source"}):
        section, _, name = key.partition(".")  # a whole section, or one key of it
        if section not in TINY_PARAMS or (name and name not in TINY_PARAMS[section]):
            missing.append(key)
    assert missing == []
