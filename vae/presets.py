"""Named presets: sets of ``params.yaml`` overrides that ``dvc exp run`` applies.

``presets.yaml`` is the one place they are defined, as ``name: {section.key: value}``. A preset
is not a second configuration: ``vae preset NAME`` prints it as DVC's own ``-S`` flags, so an
experiment records the values in its params.yaml, ``dvc exp show`` lists them, and the stages
read params.yaml alone, as always::

    dvc exp run -n quality $(vae preset quality)

Every preset is checked against the current params.yaml before it is printed: a key that does
not exist or a value out of range stops with exit code 2 and names the key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from vae.config import ConfigError
from vae.params import load_params, parse_params

__all__ = ["PRESETS", "apply_preset", "dvc_flags", "load_presets"]

PRESETS = Path("presets.yaml")


def load_presets(path: str | Path = PRESETS) -> dict[str, dict[str, Any]]:
    """``{name: {"section.key": value}}`` from ``path``; refuses anything else."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; run from the project root") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML syntax error: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of preset names to overrides")
    for name, overrides in raw.items():
        if not isinstance(overrides, dict) or not overrides:
            raise ConfigError(f"{path}: preset {name!r}: expected a mapping of section.key: value")
        for key in overrides:
            if not isinstance(key, str) or key.count(".") != 1:
                raise ConfigError(f"{path}: preset {name!r}: {key!r} is not a section.key name")
    return raw


def apply_preset(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the params mapping with ``overrides`` applied; validated by ``parse_params``."""
    out = copy.deepcopy(params)
    for key, value in overrides.items():
        section, name = key.split(".")
        out.setdefault(section, {})[name] = value
    parse_params(out)
    return out


def dvc_flags(name: str, presets: str | Path = PRESETS, params: str | Path = "params.yaml") -> str:
    """The preset as ``dvc exp run`` flags, ``-S section.key=value ...``, once validated."""
    table = load_presets(presets)
    if name not in table:
        raise ConfigError(f"{presets}: no preset {name!r}; expected one of {', '.join(table)}")
    try:
        apply_preset(load_params(params).to_dict(), table[name])
    except ConfigError as exc:
        raise ConfigError(f"{presets}: preset {name!r}: {exc}") from None
    return " ".join(f"-S {key}={_yaml_scalar(value)}" for key, value in table[name].items())


def _yaml_scalar(value: Any) -> str:
    """How DVC reads a ``-S`` value back: as YAML, so ``true``, ``0.999`` and words round-trip."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    text = text.removesuffix("...").strip()
    if any(c.isspace() for c in text):
        raise ConfigError(f"preset value {value!r} holds whitespace; the shell would split it")
    return text
