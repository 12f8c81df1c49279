"""Self-describing checkpoints, written atomically and loaded with ``weights_only=True``.

``models/checkpoint.pt`` (every epoch, for resuming) holds the model, the optimiser, the run's
identity (``run_identity``: the params that define the run, a hash of the training code and of
the data), the epoch and step, the RNG states, the history so far, the best weights and the
library versions; ``why_not_resume`` decides whether it continues a run. ``models/model.pt``
(the best epoch, what later stages read) holds the weights plus what is needed to rebuild the
model: ``load_model`` never guesses.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

import vae
from vae.atomic import atomic_torch_save
from vae.config import Config, ConfigError, DataConfig, ModelConfig
from vae.core.model import VAE
from vae.errors import PermanentError
from vae.imports import ROOT as PACKAGE
from vae.imports import closure, module_file

__all__ = [
    "CheckpointError",
    "behaviour",
    "code_fingerprint",
    "fingerprinted_modules",
    "load_checkpoint",
    "load_model",
    "run_identity",
    "save_checkpoint",
    "save_model",
    "versions",
    "why_not_resume",
]

CHECKPOINT_FORMAT = "vae-checkpoint/1"
MODEL_FORMAT = "vae-model/1"


class CheckpointError(PermanentError, RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the current params."""


def versions() -> dict[str, str]:
    return {"torch": str(torch.__version__), "vae": str(vae.__version__)}


def _load(path: Path, fmt: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; run `vae train` first")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle, not a torch file
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160]}); delete it and run `vae train` again"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not a {fmt} file (format {found!r})")
    return obj


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return _load(Path(path), CHECKPOINT_FORMAT)


# What decides the numbers a training step produces: the training module and every vae module
# that importing it runs, found by the import walker (no list kept by hand). A checkpoint written
# by code that behaves differently is not resumed. Behaviour, not bytes: DVC reruns `train` on
# any byte change of a dependency, and after a comment or docstring edit that rerun should be a
# cheap resume, not a retraining from scratch. The callbacks (checkpoints, tracking, the log
# line, the progress bar) are imported inside `train()`, so editing them resumes too.
TRAINING_MODULE = "vae.training.train"


def fingerprinted_modules(root: Path = PACKAGE) -> list[str]:
    """The modules :func:`code_fingerprint` hashes, sorted (``root``: the vae package folder)."""
    return sorted(closure([TRAINING_MODULE], deferred=False, root=root))


def behaviour(source: str) -> str:
    """The module's syntax tree without docstrings (comments and layout never reach the AST)."""
    tree = ast.parse(source)
    scopes = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    for node in ast.walk(tree):
        first = node.body[0] if isinstance(node, scopes) and node.body else None
        value = first.value if isinstance(first, ast.Expr) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):  # a docstring
            node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def code_fingerprint(root: Path = PACKAGE) -> str:
    """sha256 over the names and behaviour (:func:`behaviour`) of :func:`fingerprinted_modules`."""
    h = hashlib.sha256()
    for name in fingerprinted_modules(root):
        h.update(name.encode())
        h.update(behaviour((module_file(name, root) or Path(name)).read_text()).encode())
    return h.hexdigest()


def run_identity(cfg: Config, dataset_sha256: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the params (hardware knobs excluded), the
    training code and the data. Stored in every checkpoint under these keys."""
    train = dataclasses.asdict(cfg.train)
    # Growing `epochs` continues a constant-lr run; a decaying lr is laid out over `epochs`.
    hardware = ("device", "precision", "compile", "num_threads")
    hardware += ("nnodes", "nproc_per_node", "rdzv_endpoint")  # N processes follow 1's path
    for k in hardware if cfg.train.lr_decay > 0 else ("epochs", *hardware):
        train.pop(k)
    params = {"data": dataclasses.asdict(cfg.data), "model": dataclasses.asdict(cfg.model)}
    return {
        "params": {**params, "train": train},
        "code_sha256": code_fingerprint(),
        "dataset_sha256": dataset_sha256,
    }


def why_not_resume(ckpt: dict[str, Any], identity: dict[str, Any], epochs: int) -> str | None:
    """Why ``ckpt`` cannot continue the run ``identity`` of ``epochs`` epochs; None if it can."""
    if ckpt.get("code_sha256") != identity["code_sha256"]:
        return "the training code changed since it was written"
    params = identity["params"]
    if ckpt["params"] != params or ckpt["dataset_sha256"] != identity["dataset_sha256"]:
        why = (
            "; ".join(
                diff_params(ckpt["params"].get(s, {}), params[s], s)
                for s in ("data", "model", "train")
                if ckpt["params"].get(s) != params[s]
            )
            or "other data"
        )
        return f"it was trained with other params or data ({why})"
    if ckpt["epoch"] > epochs:
        return f"it has {ckpt['epoch']} epochs, more than train.epochs={epochs}"
    return None


def save_checkpoint(path: str | Path, identity: dict[str, Any], **state: Any) -> None:
    """Atomically write a checkpoint: ``identity`` (see ``run_identity``) plus the run's state."""
    atomic_torch_save(
        path, {"format": CHECKPOINT_FORMAT, **identity, **state, "versions": versions()}
    )


def save_model(path: str | Path, model: VAE, data_cfg: DataConfig, extra: dict[str, Any]) -> None:
    atomic_torch_save(
        path,
        {
            "format": MODEL_FORMAT,
            "model": model.state_dict(),
            "params": {"model": _asdict(model.cfg), "data": _asdict(data_cfg)},
            "image_shape": list(model.image_shape),
            "versions": versions(),
            **extra,
        },
    )


def load_model(
    path: str | Path, expected: ModelConfig | None = None, device: torch.device | str = "cpu"
) -> tuple[VAE, dict[str, Any]]:
    """Rebuild the model from ``models/model.pt``.

    With ``expected``, the saved model params must equal it, so a model trained with other
    params is refused with the differing keys named, never partially loaded.
    """
    obj = _load(Path(path), MODEL_FORMAT)
    try:
        cfg = ModelConfig.from_saved(obj["params"]["model"])
    except (TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: unreadable model params ({exc})") from None
    if expected is not None and cfg != expected:
        diff = diff_params(_asdict(cfg), _asdict(expected), "model")
        raise CheckpointError(
            f"{path}: trained with other params ({diff}); rerun `vae train` (or `dvc repro`)"
        )
    model = VAE(cfg, tuple(obj["image_shape"]))
    try:
        model.load_state_dict(obj["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model ({exc})") from None
    return model.to(device).eval(), obj


def diff_params(old: dict[str, Any], new: dict[str, Any], prefix: str) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [
        f"{prefix}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)
    ]
    return ", ".join(diffs) or "no difference"


def _asdict(cfg: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"expected a config dataclass, got {type(cfg).__name__}")
    return dataclasses.asdict(cfg)
