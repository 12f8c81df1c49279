"""``params.yaml``, read once: strict YAML, every section present, every value checked.

:func:`load_params` reads the file, :func:`parse_params` validates a parsed mapping; both return
the frozen :class:`vae.config.Config`. An unknown key, a wrong type, an out-of-range value or an
incompatible combination raises :class:`ConfigError`, one line naming the key (and, from a
file, the file and the key's line). The CLI turns that into exit code 2 before any work starts.
The dataclasses in :mod:`vae.config` ship inside every registered model; this module does not.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from vae.config import Config, ConfigError, ScheduleConfig

__all__ = ["load_params", "parse_params"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``1e-3`` (YAML 1.1 wants ``1.0e-3``)
    and refuses a duplicated key, which plain YAML resolves silently to the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"line {line}: key {key!r} is duplicated (first at line {seen[key]}); "
                    "YAML would silently keep the last one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


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
        tuple[float, ...]: "a list of numbers",
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
    elif origin is tuple and isinstance(value, (list, tuple)):  # tuple[T, ...]: a list of T
        item = typing.get_args(tp)[0]
        return tuple(_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    raise ConfigError(f"{key}: {value!r} has the wrong type; expected {_describe(tp)}")


def _check_range(key: str, value: Any, meta: Any) -> None:
    bounds = {k: v for k, v in meta.items() if v is not None}
    if not bounds or value is None:
        return
    if isinstance(value, tuple):  # each item of a list
        for i, v in enumerate(value):
            _check_range(f"{key}[{i}]", v, meta)
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
    if not re.match(r"^([^\s:\[\]]+|\[[0-9a-fA-F:.]+\]):\d{1,5}$", cfg.train.rdzv_endpoint):
        raise ConfigError(
            f"train.rdzv_endpoint: {cfg.train.rdzv_endpoint!r} is not HOST:PORT; expected e.g. "
            "127.0.0.1:29400 or node0.example.org:29400"
        )
    if cfg.model.likelihood == "gaussian" and cfg.data.binarize != "none":
        raise ConfigError(
            f"model.likelihood: 'gaussian' does not fit data.binarize: {cfg.data.binarize!r}; "
            "binarized pixels are discrete, so use model.likelihood: 'bernoulli' or "
            "data.binarize: 'none'"
        )
    tc = cfg.train
    free_bits = tc.free_bits_per_layer(cfg.model.latent_layers)
    if tc.objective == "iwae" and (tc.beta != 1.0 or any(free_bits)):
        raise ConfigError(
            "train.objective: 'iwae' is a bound on log p(x) with no KL term to reweight or floor, "
            "so it takes no train.beta or train.free_bits; set them to 1.0 and 0.0"
        )
    if len(free_bits) != cfg.model.latent_layers:
        raise ConfigError(
            f"train.free_bits: {list(free_bits)} has {len(free_bits)} value(s) and "
            f"model.latent_layers is {cfg.model.latent_layers}; expected a number, or one per "
            "layer (bottom first)"
        )
    if cfg.model.latent_layers == 1 and cfg.model.lower_inference != "branch":
        raise ConfigError(
            "model.lower_inference: 'shared' is a choice of two stochastic layers, and "
            "model.latent_layers is 1; set it to 'branch' or model.latent_layers: 2"
        )
    gc = cfg.generate
    if gc.sampler == "prior" and gc.temperature != 1.0:
        raise ConfigError(
            f"generate.temperature: {gc.temperature!r} applies to the gmm and diffusion "
            "samplers, and generate.sampler is 'prior'; set it to 1.0 or pick another sampler"
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


def _check_schedule(schedule: ScheduleConfig) -> None:
    # cronsim (a small pure-Python parser in the core install) refuses bad fields and dates
    # that never come, such as 30 February; the first firing from now proves the rest.
    from datetime import UTC, datetime

    from cronsim import CronSim, CronSimError

    if len(schedule.cron.split()) != 5:
        raise ConfigError(
            f"schedule.cron: {schedule.cron!r} is not a cron expression; expected 5 fields "
            "(minute hour day-of-month month day-of-week), e.g. '0 3 * * 1'"
        )
    try:
        next(CronSim(schedule.cron, datetime.now(UTC)))
    except (CronSimError, StopIteration) as exc:
        raise ConfigError(
            f"schedule.cron: {schedule.cron!r} never fires or is not valid cron ({exc}); "
            "expected e.g. '0 3 * * 1'"
        ) from None
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
    """Read, validate and freeze ``params.yaml``. Raises :class:`ConfigError` on any problem.

    Every section must be present (keys inside one may take their defaults): an empty file, or a
    missing section, would otherwise run on built-in defaults without a word. Each error names
    the file and, where it can, the key's line.
    """
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
    except ConfigError as exc:  # a duplicated key: "line N: ..."
        raise ConfigError(f"{path}, {exc}") from None
    sections = [f.name for f in dataclasses.fields(Config)]
    if raw is None:
        raise ConfigError(
            f"{path}: holds no params (it is empty or only comments); expected the sections "
            f"{', '.join(sections)}"
        )
    if isinstance(raw, dict):
        missing = [name for name in sections if name not in raw]
        if missing:
            name = missing[0]
            raise ConfigError(
                f"{path}: section {name!r} is missing; every section must be present "
                f"(its keys may take their defaults: `{name}: {{}}`)"
            )
    try:
        return parse_params(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}{_line_of(text, str(exc))}: {exc}") from None


def _line_of(text: str, message: str) -> str:
    """``", line N"`` for the ``section.key`` a message starts with, if the file has it."""
    key = re.match(r"^([A-Za-z_][\w]*)(?:\.([A-Za-z_][\w]*))?:", message)
    if key is None:
        return ""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    for part in (p for p in key.groups() if p):
        if not isinstance(node, yaml.MappingNode):
            return ""
        found = [(k, v) for k, v in node.value if k.value == part]
        if not found:
            return ""
        key_node, node = found[0]
    return f", line {key_node.start_mark.line + 1}"
