"""``vae <stage>``: the command line. Parsing and error handling only; see vae/stages.py.

Each command reads params.yaml once (a bad value exits with code 2 before any work). The exit
code follows from the error's base class in :mod:`vae.errors`, so that a scheduler can tell what
is worth retrying (``pipelines/tasks.py`` does): 0 done; 1 an expected failure that a retry
cannot fix, with one line saying what and where; 2 a bad param or argument, before any work; 75
(``EX_TEMPFAIL``) a service, download or lock out of reach, worth a retry later; 70
(``EX_SOFTWARE``, from the ``vae`` command) an unexpected exception, with its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from vae.config import Config, ConfigError
from vae.errors import EXIT_ERROR, EXIT_SOFTWARE, EXIT_USAGE, Bug, VaeError, exit_code
from vae.outputs import METRICS, MODELS, PLOTS, PREPARED, RAW, REPORTS
from vae.params import load_params
from vae.serving.consumer_cli import CONSUMER_COMMANDS, add_consumer_parsers
from vae.stages import (
    cmd_classify,
    cmd_download,
    cmd_evaluate,
    cmd_export,
    cmd_generate,
    cmd_ingest,
    cmd_log_run,
    cmd_prepare,
    cmd_register,
    cmd_score,
    cmd_train,
)

__all__ = [
    "build_parser",
    "main",
    "run",
]

# The stages that use train.device, and write models/, metrics/ or the registry.
DEVICE_COMMANDS = ("train", "evaluate", "export", "generate", "classify", "score", "register")


_FOLDERS = {
    "--data": (PREPARED, "the prepared splits"),
    "--models": (MODELS, "model.pt, the checkpoint and the MLflow run file"),
    "--metrics": (METRICS, "the metrics JSON files"),
    "--plots": (PLOTS, "the per-epoch CSV"),
    "--reports": (REPORTS, "the PNG grids"),
}


def _folders(p: argparse.ArgumentParser, *flags: str) -> None:
    for flag in flags:
        default, what = _FOLDERS[flag]
        p.add_argument(flag, default=str(default), help=f"{what} (default: %(default)s)")


def _out(p: argparse.ArgumentParser, default: str, what: str) -> None:
    p.add_argument("--out", default=default, help=f"{what} (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from vae import __version__

    parser = argparse.ArgumentParser(
        prog="vae",
        description="Train, evaluate and use a variational autoencoder. The pipeline stages "
        "read params.yaml (dvc repro runs them in order); encode, sample, reconstruct and "
        "reregister work on any registered model, with no project.",
        epilog="Exit codes: 0 done; 1 a failure a retry cannot fix; 2 a bad param or argument, "
        "before any work; 75 a service, download or lock was unavailable, worth a retry; "
        "70 an unexpected error (with its traceback).",
    )
    parser.add_argument("--version", action="version", version=f"vae {__version__}")
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="check data.source, then copy it to data/raw for DVC")
    _out(p, str(RAW), "where the copy goes")
    p.add_argument("--check", action="store_true", help="only check every file; write nothing")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("download", help="download the IDX dataset with torchvision")
    p.add_argument("--out", required=True, help="a folder; then set data.source to it")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("prepare", help="read data/raw, write seeded train/val/test splits")
    p.add_argument("--raw", default=str(RAW), help="the ingested raw data (default: %(default)s)")
    _out(p, str(PREPARED), "where the splits go")
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse raw files whose sha256 differ from the existing manifest",
    )
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train (resuming from models/checkpoint.pt when it fits)")
    _folders(p, "--data", "--models", "--metrics", "--plots")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument(
        "--join",
        action="store_true",
        help="train.nnodes > 1: join the run that `vae train` leads at train.rdzv_endpoint, "
        "writing nothing here",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("log-run", help="re-send local metrics and artifacts to MLflow")
    _folders(p, "--data", "--models", "--metrics", "--plots", "--reports")
    p.set_defaults(func=cmd_log_run)

    for name, func, out, help_ in (
        ("evaluate", cmd_evaluate, None, "test ELBO, importance-weighted log p(x), active units"),
        ("export", cmd_export, "data/embeddings", "latent embeddings as Parquet + their use"),
        ("generate", cmd_generate, "reports", "PNG grids: samples, reconstructions, latent space"),
        ("classify", cmd_classify, None, "train the feature classifier that score measures with"),
        ("score", cmd_score, None, "sample quality: Frechet distance, precision and recall"),
        ("register", cmd_register, None, "register the model in MLflow; gate the champion alias"),
    ):
        p = sub.add_parser(name, help=help_)
        _folders(p, "--data", "--models", "--metrics")
        if out:
            _out(p, out, "where the outputs go")
        p.set_defaults(func=func)
    p = sub.add_parser(
        "preset",
        help="print a preset of presets.yaml as dvc exp run flags: "
        "dvc exp run $(vae preset quality)",
    )
    p.add_argument("name", nargs="?", help="the preset; without it, list them all")
    p.add_argument("--presets", default="presets.yaml", help="(default: %(default)s)")
    p.set_defaults(func=_cmd_preset)
    add_consumer_parsers(sub)
    return parser


def _cmd_preset(cfg: Config, args: argparse.Namespace) -> None:
    from vae.presets import dvc_flags, load_presets

    names = [args.name] if args.name else list(load_presets(args.presets))
    for name in names:
        flags = dvc_flags(name, args.presets, args.params)
        print(flags if args.name else f"{name}: {flags}")


def _log_format() -> str:
    """Bare messages on a terminal; with a timestamp and level in a log file or a scheduler."""
    if sys.stderr.isatty():
        return "%(message)s"
    return "%(asctime)s %(levelname)s %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format=_log_format(),
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request to Prefect's API
    if args.command in CONSUMER_COMMANDS:
        return _consume(args)
    missing = _missing_pipeline_extra()
    if missing:
        print(
            f"vae {args.command}: the pipeline stages need the pipeline extra "
            f"(pip install 'vae[pipeline]'); {missing} is not installed",
            file=sys.stderr,
        )
        return EXIT_ERROR
    try:
        cfg = load_params(args.params)
        if args.command in DEVICE_COMMANDS:  # a device this machine lacks: before any work
            from vae.training.distributed import select_device

            try:
                select_device(cfg.train.device)
            except ConfigError as exc:
                raise ConfigError(f"{args.params}: {exc}") from None
    except ConfigError as exc:
        print(f"vae: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    func: Callable[[Config, argparse.Namespace], None] = args.func
    if args.command not in DEVICE_COMMANDS:
        return _failing_in_one_line(args.command, func, cfg, args)
    from vae.locks import workspace_writer  # the ones that write models/, metrics/, the registry

    def write() -> None:
        with workspace_writer("one writer per workspace"):
            func(cfg, args)

    return _failing_in_one_line(args.command, write)


def _failing_in_one_line(command: str, func: Callable[..., None], *args: object) -> int:
    """Run ``func``; an error of :mod:`vae.errors` is one line and its base class's exit code
    (a :class:`~vae.errors.Bug` keeps its traceback, as does any other exception)."""
    try:
        func(*args)
    except VaeError as exc:
        if isinstance(exc, Bug):
            raise
        print(f"vae {command}: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    return 0


def _missing_pipeline_extra() -> str | None:
    """The first module of the ``pipeline`` extra that is not installed, if any."""
    import importlib.util

    for module in ("dvc", "prefect", "torchvision", "sklearn", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            return module
    return None


def _consume(args: argparse.Namespace) -> int:
    """A consumer command: no params.yaml, only a model URI and its inputs."""
    return _failing_in_one_line(args.command, args.func, args)


def run() -> None:
    """The ``vae`` command: :func:`main`, with an unexpected exception as exit code 70."""
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    except Exception:  # noqa: BLE001 - reported in full; the code says "not a known failure"
        traceback.print_exc()
        code = EXIT_SOFTWARE
    sys.exit(code)
