"""``vae encode | sample | reconstruct | reregister | champion-webhook``: the registry's side.

They need no ``params.yaml`` and no project: only a model URI and, for ``models:/`` and
``runs:/`` URIs, a tracking store (``--tracking-uri`` or ``MLFLOW_TRACKING_URI``). The library
is :mod:`vae.serving.consume`; these functions only parse and print.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

__all__ = ["CONSUMER_COMMANDS", "add_consumer_parsers"]

log = logging.getLogger("vae")
CONSUMER_COMMANDS = ("encode", "sample", "reconstruct", "reregister", "champion-webhook")
URI_HELP = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a model folder"


def _count(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="URI", help=URI_HELP)
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="the MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db if it exists)",
    )


def _max_pixels(p: argparse.ArgumentParser) -> None:
    from vae.config import MAX_IMAGE_PIXELS

    p.add_argument(
        "--max-pixels",
        type=_count,
        default=MAX_IMAGE_PIXELS,
        help="refuse, undecoded, an image whose header declares more pixels (width x height; "
        f"default {MAX_IMAGE_PIXELS:,})",
    )


def add_consumer_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="embed images with any model: one Parquet row per image")
    _common(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG/JPEG files, folders, IDX files")
    p.add_argument(
        "--out", required=True, help="the Parquet file (spark: a folder, or a URI such as hdfs://)"
    )
    p.add_argument("--batch-size", type=_count, default=512, help="images a batch (default 512)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--engine",
        choices=("local", "spark"),
        default="local",
        help="local: this process; spark: mlflow.pyfunc.spark_udf over binaryFile (PNG/JPEG)",
    )
    p.add_argument("--master", default="local[2]", help="the Spark master (default local[2])")
    _max_pixels(p)
    p.set_defaults(func=_encode)

    p = sub.add_parser(
        "sample", help="new images from the model's registered sampler, as a PNG grid"
    )
    _common(p)
    p.add_argument("-n", type=_count, default=64, help="how many images (default 64)")
    p.add_argument("--out", required=True, type=Path, help="the PNG file")
    p.add_argument("--seed", type=int, default=0, help="the generator's seed (default 0)")
    p.add_argument("--sample", action="store_true", help="sample p(x|z), not its mean")
    p.set_defaults(func=_sample)

    p = sub.add_parser("reconstruct", help="images over their reconstructions, as a PNG grid")
    _common(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG/JPEG files, folders, IDX files")
    p.add_argument("--out", required=True, type=Path, help="the PNG file")
    p.add_argument("-n", type=_count, default=32, help="how many of the inputs (default 32)")
    _max_pixels(p)
    p.set_defaults(func=_reconstruct)

    p = sub.add_parser(
        "reregister", help="register a version's weights again as a self-contained model"
    )
    _common(p)
    p.set_defaults(func=_reregister)
    p = sub.add_parser(
        "champion-webhook",
        help="create (or update) the MLflow webhook that fires when an alias moves; "
        "an admin call, secret from $VAE_CHAMPION_WEBHOOK_SECRET",
    )
    p.add_argument("--url", help="the receiver (default: $VAE_CHAMPION_WEBHOOK_URL)")
    p.set_defaults(func=_champion_webhook)


def _encode(args: argparse.Namespace) -> None:
    if args.engine == "spark":
        from vae.serving.spark import encode_with_spark

        result = encode_with_spark(
            args.model, args.inputs, args.out, args.tracking_uri, args.master, args.max_pixels
        )
    else:
        from vae.serving.consume import encode_to_parquet, load_model

        model = load_model(args.model, args.tracking_uri)
        result = encode_to_parquet(
            model,
            args.inputs,
            Path(args.out),
            args.batch_size,
            not args.no_progress,
            args.max_pixels,
        )
    log.info(
        "%s: %d rows in %.1f s (%.0f rows/s)",
        args.out,
        result["rows"],
        result["seconds"],
        result["rows_per_second"],
    )


def _sample(args: argparse.Namespace) -> None:
    from vae.serving.consume import load_model, sample_grid

    sample_grid(load_model(args.model, args.tracking_uri), args.n, args.out, args.seed, args.sample)
    log.info("%s: %d images", args.out, args.n)


def _reconstruct(args: argparse.Namespace) -> None:
    from vae.serving.consume import load_model, reconstruct_grid

    decoded = reconstruct_grid(
        load_model(args.model, args.tracking_uri), args.inputs, args.out, args.n, args.max_pixels
    )
    log.info("%s: %d images and their reconstructions", args.out, len(decoded))


def _reregister(args: argparse.Namespace) -> None:
    from vae.mlops.registry import reregister
    from vae.serving.consume import resolve_tracking_uri

    uri = resolve_tracking_uri(args.model, args.tracking_uri)
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri  # vae.mlops.registry reads the store from there
    print(json.dumps(reregister(args.model)))


def _champion_webhook(args: argparse.Namespace) -> None:
    from vae.mlops.webhooks import ensure_champion_webhook

    print(json.dumps(ensure_champion_webhook(args.url)))
