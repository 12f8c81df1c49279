"""Typed, frozen configuration parsed once from ``params.yaml``.

Every section of ``params.yaml`` maps to one frozen dataclass below. Parsing is strict: an
unknown key, a wrong type or an out-of-range value raises :class:`ConfigError` whose message is
one line that names the key and the accepted values. The CLI turns that into exit code 2 before
any work starts. Library functions take these objects; they never read ``params.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "ExportConfig",
    "GenerateConfig",
    "MlflowConfig",
    "ModelConfig",
    "ScheduleConfig",
    "TrainConfig",
    "load_params",
    "parse_params",
]


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the key."""


def _range(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> dict[str, float | None]:
    return {"ge": ge, "gt": gt, "le": le, "lt": lt}


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["fashion_mnist", "mnist", "folder"] = "fashion_mnist"
    # The raw data, one folder: the four IDX files (fashion_mnist, mnist), or same-sized images
    # with one sub-folder per class (folder). DVC hashes it; `vae ingest` copies it to data/raw.
    source: str = "/usr/share/datasets/fashion-mnist"
    val_fraction: float = field(default=0.1, metadata=_range(gt=0.0, lt=1.0))
    # dynamic: resample x ~ Bernoulli(pixel) every time a batch is drawn; static: sample once in
    # `prepare`; none: keep grayscale intensities in [0, 1].
    binarize: Literal["dynamic", "static", "none"] = "dynamic"
    seed: int = field(default=0, metadata=_range(ge=0))


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["mlp", "conv"] = "mlp"
    latent_dim: int = field(default=32, metadata=_range(ge=1, le=4096))
    hidden_dim: int = field(default=400, metadata=_range(ge=1, le=65536))
    conv_channels: int = field(default=32, metadata=_range(ge=1, le=1024))
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    # Gaussian decoder only: one learned log-variance per pixel, or one shared by all pixels.
    gaussian_variance: Literal["per_pixel", "shared"] = "per_pixel"
    # The hidden layers' nonlinearity; leaky_relu has a negative slope of 0.1. With plain relu,
    # most encoder units stop firing for every image within a few epochs (47% after 4 epochs of
    # the classic recipe, 81% at batch 256 and lr 3e-3), and a dead unit never learns again.
    activation: Literal["relu", "leaky_relu", "silu"] = "leaky_relu"

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> ModelConfig:
        """The config of a saved model; keys added since it was saved keep their old meaning."""
        return cls(**{"activation": "relu", **saved})  # models saved before `activation` existed


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=30, metadata=_range(ge=1, le=100000))
    batch_size: int = field(default=256, metadata=_range(ge=1))
    lr: float = field(default=3e-3, metadata=_range(gt=0.0, le=10.0))
    # The fraction of the run's last steps over which the lr falls (half-cosine) from `lr` to 0;
    # 0 = constant lr, 1 = cosine over the whole run. Above 0, the schedule is laid out over
    # `epochs`, so a checkpoint is resumed only with the same `epochs`.
    lr_decay: float = field(default=0.2, metadata=_range(ge=0.0, le=1.0))
    beta: float = field(default=1.0, metadata=_range(ge=0.0))
    # The KL weight rises linearly from 0 to `beta` over this many optimiser steps (0 = off).
    kl_warmup_steps: int = field(default=0, metadata=_range(ge=0))
    # Free bits: each latent dimension's batch-mean KL is floored at this many nats (0 = off).
    free_bits: float = field(default=0.0, metadata=_range(ge=0.0))
    grad_clip: float = field(default=0.0, metadata=_range(ge=0.0))
    seed: int = field(default=0, metadata=_range(ge=0))
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    num_threads: int = field(default=0, metadata=_range(ge=0, le=1024))


@dataclass(frozen=True)
class EvaluateConfig:
    iw_samples: int = field(default=500, metadata=_range(ge=1, le=1000000))
    # Images per chunk; each chunk holds batch_size * iw_samples latent samples at once.
    batch_size: int = field(default=100, metadata=_range(ge=1))
    active_unit_threshold: float = field(default=0.01, metadata=_range(gt=0.0))
    seed: int = field(default=0, metadata=_range(ge=0))


@dataclass(frozen=True)
class ExportConfig:
    batch_size: int = field(default=1000, metadata=_range(ge=1))
    knn_k: int = field(default=5, metadata=_range(ge=1))
    probe_max_iter: int = field(default=1000, metadata=_range(ge=1))
    seed: int = field(default=0, metadata=_range(ge=0))  # binarization of dynamic data


@dataclass(frozen=True)
class GenerateConfig:
    n_samples: int = field(default=64, metadata=_range(ge=1, le=10000))
    nrow: int = field(default=8, metadata=_range(ge=1, le=1000))
    n_reconstructions: int = field(default=16, metadata=_range(ge=1, le=10000))
    n_interpolations: int = field(default=8, metadata=_range(ge=1, le=1000))
    interpolation_steps: int = field(default=10, metadata=_range(ge=2, le=1000))
    seed: int = field(default=0, metadata=_range(ge=0))


@dataclass(frozen=True)
class MlflowConfig:
    # Track every pipeline run (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project).
    enabled: bool = True
    experiment: str = "vae-fashion-mnist"
    registered_model: str = "vae-fashion-mnist"
    # A DVC experiment (`dvc exp run`, queued or --temp) logs its run and model but registers
    # no model version unless this is true; `dvc repro` always registers.
    register_experiments: bool = False


@dataclass(frozen=True)
class ScheduleConfig:
    # When the Prefect flow `vae-retrain` runs (pipelines/serve.py, prefect.yaml): a 5-field cron
    # expression (minute hour day-of-month month day-of-week) in an IANA time zone.
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    # The longest any one flow task (a DVC stage, an experiment) may run; then its whole
    # process group is killed and the flow run fails. Also how long a flow run waits for
    # another one in the same workspace to finish.
    timeout_minutes: float = field(default=180.0, metadata=_range(gt=0.0, le=10080.0))

    @property
    def timeout_seconds(self) -> float:
        return self.timeout_minutes * 60.0


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.001, ...}``: the form MLflow logs as params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


# ---------------------------------------------------------------------------------------------
# Parsing


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``1e-3`` (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        type(None): "null",
    }.get(tp, str(tp))


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: {value!r} has the wrong type; expected {_describe(tp)}")


def _check_range(key: str, value: Any, meta: Any) -> None:
    bounds = {k: v for k, v in meta.items() if v is not None}
    if not bounds or value is None:
        return
    ok = all(
        (op == "ge" and value >= b)
        or (op == "gt" and value > b)
        or (op == "le" and value <= b)
        or (op == "lt" and value < b)
        for op, b in bounds.items()
    )
    if not ok:
        sym = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        expected = " and ".join(f"{sym[op]} {b:g}" for op, b in bounds.items())
        raise ConfigError(f"{key}: {value!r} is out of range; expected a value {expected}")


_RENAMED = {"data.folder": "data.source"}


def _unknown(key: str, valid: list[str]) -> ConfigError:
    if key in _RENAMED:
        return ConfigError(f"{key}: renamed to {_RENAMED[key]}; rename the key")
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{key}: unknown key{hint}; valid keys are {', '.join(valid)}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown(key, list(fields))
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
            continue
        value = _check_type(key, value, tp)
        _check_range(key, value, fields[name].metadata)
        kwargs[name] = value
    return cls(**kwargs)


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _cross_checks(cfg: Config) -> None:
    if not _DEVICE.match(cfg.train.device):
        raise ConfigError(
            f"train.device: {cfg.train.device!r} is not a device; expected auto, cpu, mps, "
            "cuda or cuda:N"
        )
    if cfg.model.likelihood == "gaussian" and cfg.data.binarize != "none":
        raise ConfigError(
            f"model.likelihood: 'gaussian' does not fit data.binarize: {cfg.data.binarize!r}; "
            "binarized pixels are discrete, so use model.likelihood: 'bernoulli' or "
            "data.binarize: 'none'"
        )
    for key in ("experiment", "registered_model"):
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,255}$", getattr(cfg.mlflow, key)):
            raise ConfigError(
                f"mlflow.{key}: {getattr(cfg.mlflow, key)!r} is not a valid name; "
                "expected letters, digits, '.', '_' or '-'"
            )
    if not cfg.data.source.strip():
        raise ConfigError("data.source: empty; expected the folder that holds the raw data")
    _check_schedule(cfg.schedule)


_CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-]+$")


def _check_schedule(schedule: ScheduleConfig) -> None:
    fields = schedule.cron.split()
    if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
        raise ConfigError(
            f"schedule.cron: {schedule.cron!r} is not a cron expression; expected 5 fields "
            "(minute hour day-of-month month day-of-week), e.g. '0 3 * * 1'"
        )
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(schedule.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"schedule.timezone: {schedule.timezone!r} is not a time zone; expected an IANA "
            "name such as 'UTC' or 'Europe/Berlin'"
        ) from None


def parse_params(raw: Any) -> Config:
    """Validate a parsed ``params.yaml`` mapping and return the frozen :class:`Config`."""
    cfg = _build(Config, raw, "")
    _cross_checks(cfg)
    return cfg


def load_params(path: str | Path = "params.yaml") -> Config:
    """Read, validate and freeze ``params.yaml``. Raises :class:`ConfigError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        msg = f"{path}: file not found; run from the project root or pass --params"
        raise ConfigError(msg) from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    return parse_params(raw)
