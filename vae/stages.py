"""The stage commands: thin shells over the library, one per DVC stage.

Each reads its inputs, calls one library function and writes its outputs atomically; the MLflow
run is opened before the stage does any work, so an unreachable server fails it at once. Paths
follow the layout that dvc.yaml declares; every one can be overridden on the command line.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from vae.config import Config
from vae.errors import PermanentError
from vae.outputs import METRICS, MODELS, PLOTS, REPORTS, RUN_FILE, STAGE_RECORDS

if TYPE_CHECKING:
    import torch

    from vae.core.model import VAE
    from vae.core.sampler import LatentDensity
    from vae.mlops.mlflow_tracker import MlflowTracker
    from vae.training.run import TrainResult

log = logging.getLogger("vae")


class StageError(PermanentError, RuntimeError):
    """An expected failure with a one-line explanation (exit code 1)."""


def _check_prepared(cfg: Config, prepared: Path) -> dict:
    from vae.atomic import load_json

    path = prepared / "manifest.json"
    if not path.is_file():
        raise StageError(f"{path}: not found; run `vae prepare` first")
    manifest = load_json(path)
    for key in ("dataset", "binarize", "seed", "val_fraction"):
        if manifest.get(key) != getattr(cfg.data, key):
            raise StageError(
                f"{prepared} was prepared with data.{key}: {manifest.get(key)!r} but params say "
                f"{getattr(cfg.data, key)!r}; run `vae prepare` again"
            )
    return manifest


def _stage_run(cfg: Config, args: argparse.Namespace) -> MlflowTracker | None:
    """The run ``vae train`` started, opened before the stage does any work."""
    if not cfg.mlflow.enabled:
        return None
    from vae.mlops.pipeline_run import tracker_from_run_file

    return tracker_from_run_file(Path(args.models) / RUN_FILE)


def _folders(args: argparse.Namespace, **override: str) -> dict[str, Path]:
    """The command's output folders, by the names :data:`STAGE_RECORDS` uses."""
    default = {"metrics": METRICS, "plots": PLOTS, "reports": REPORTS, "models": MODELS}
    return {k: Path(override.get(k) or getattr(args, k, None) or v) for k, v in default.items()}


def cmd_ingest(cfg: Config, args: argparse.Namespace) -> None:
    from vae.data.raw import check_source, ingest

    if args.check:
        raw = check_source(cfg.data.dataset, cfg.data.source, cfg.data.max_image_pixels)
        counts = ", ".join(f"{len(s)} {k}" for k, s in raw.splits.items())
        log.info("%s: %d files, %s images; all read", cfg.data.source, len(raw.sha256), counts)
        return
    ingest(cfg.data.dataset, cfg.data.source, Path(args.out), cfg.data.max_image_pixels)


def cmd_download(cfg: Config, args: argparse.Namespace) -> None:
    from vae.data.raw import download

    out = download(cfg.data.dataset, Path(args.out))
    log.info("downloaded %s to %s; set data.source: %s to use it", cfg.data.dataset, out, out)


def cmd_prepare(cfg: Config, args: argparse.Namespace) -> None:
    from vae.data.prepare import prepare

    prepare(cfg.data, Path(args.out), raw_dir=Path(args.raw), strict=args.strict)


def cmd_train(cfg: Config, args: argparse.Namespace) -> None:
    from vae.data.splits import load_split
    from vae.mlops.pipeline_run import start_pipeline_run
    from vae.training import distributed
    from vae.training.launch import launch, needs_launch, same_on_every_node
    from vae.training.train import train

    prepared = Path(args.data)
    manifest = _check_prepared(cfg, prepared)
    if needs_launch(cfg, args.join):  # train.nnodes x nproc_per_node > 1: torchrun, then back
        return launch(cfg, args)
    rank, world, ddp_device = distributed.init_from_env(cfg.train.device)
    try:
        same_on_every_node(cfg, manifest["dataset_sha256"])  # no-op in one process
        device = ddp_device or distributed.select_device(cfg.train.device)
        tracker = None
        if rank == 0:  # only rank 0 tracks and writes
            tracker = start_pipeline_run(
                cfg, Path(args.models) / RUN_FILE, manifest, device, prepared
            )
            log.info("training on %s%s", device, f" x {world} processes" if world > 1 else "")
        result = train(
            cfg,
            load_split(prepared / "train.pt", device),
            load_split(prepared / "val.pt", device),
            out_dir=Path(args.models),
            tracker=tracker,
            resume=not args.no_resume,
            dataset_sha256=manifest["dataset_sha256"],
        )
        if rank == 0:
            _write_training_outputs(cfg, result, args, tracker)
    finally:
        distributed.shutdown()


def _write_training_outputs(
    cfg: Config, result: TrainResult, args: argparse.Namespace, tracker: MlflowTracker | None
) -> None:
    from vae.atomic import atomic_write_csv, atomic_write_json
    from vae.mlops.pipeline_run import log_stage

    atomic_write_json(Path(args.metrics) / "train.json", result.metrics)
    atomic_write_csv(Path(args.plots) / "train.csv", result.history)
    if tracker is not None:
        log_stage(tracker, "train", result.metrics, _folders(args), (cfg, Path(args.data)))
        if problem := tracker.report():
            log.warning("vae train: %s", problem)
    m = result.metrics
    log.info(
        "best epoch %d: validation -ELBO %.2f nats/image; %.1f s/epoch",
        m["best_epoch"],
        m["best_val_nelbo"],
        m["seconds_per_epoch"],
    )


def _load_trained(cfg: Config, args: argparse.Namespace) -> tuple[VAE, dict, torch.device]:
    from vae.training.checkpoint import load_model
    from vae.training.distributed import select_device

    device = select_device(cfg.train.device)
    model, meta = load_model(Path(args.models) / "model.pt", expected=cfg.model, device=device)
    return model, meta, device


def _chosen_sampler(models: Path) -> LatentDensity | None:
    """The density ``vae generate`` fitted that ``generate.sampler`` chose; None for the prior."""
    from vae.core.sampler import SAMPLER_FILE, load_sampler

    if not (models / SAMPLER_FILE).is_file():  # `vae register` straight after `vae train`
        log.warning(
            "%s: missing, so the registered model samples from the prior; run `vae generate` "
            "first to register the sampler generate.sampler chooses",
            models / SAMPLER_FILE,
        )
        return None
    kind, fitted = load_sampler(models / SAMPLER_FILE)
    return fitted.get(kind)


def cmd_evaluate(cfg: Config, args: argparse.Namespace) -> None:
    from vae.data.splits import float_images, load_split
    from vae.evaluation.evaluate import evaluate
    from vae.evaluation.summary import write_record
    from vae.mlops.pipeline_run import log_stage

    prepared = Path(args.data)
    _check_prepared(cfg, prepared)
    tracker = _stage_run(cfg, args)
    model, _, device = _load_trained(cfg, args)
    test = load_split(prepared / "test.pt", device)
    metrics = evaluate(
        model, float_images(test, cfg.data.binarize, cfg.evaluate.seed), cfg.evaluate
    )
    write_record(Path(args.metrics), "eval.json", metrics)
    log_stage(tracker, "evaluate", metrics, _folders(args), (cfg, prepared))
    log.info(
        "test -ELBO %.2f, -log p(x) ~ %.2f (K=%d), gap %.2f nats; %d active units",
        -metrics["elbo"],
        metrics["nll_iw"],
        metrics["iw_samples"],
        metrics["elbo_gap"],
        metrics["active_units"],
    )


def cmd_export(cfg: Config, args: argparse.Namespace) -> None:
    from vae.data.splits import load_split
    from vae.evaluation.export import export
    from vae.evaluation.summary import write_record
    from vae.mlops.pipeline_run import log_stage

    prepared = Path(args.data)
    _check_prepared(cfg, prepared)
    tracker = _stage_run(cfg, args)
    model, _, device = _load_trained(cfg, args)
    splits = {
        name: load_split(prepared / f"{name}.pt", device) for name in ("train", "val", "test")
    }
    metrics = export(model, splits, cfg.data.binarize, cfg.export, Path(args.out))
    write_record(Path(args.metrics), "downstream.json", metrics)
    log_stage(tracker, "export", metrics, _folders(args), (cfg, prepared))
    log.info(
        "linear probe %.3f (pixels %.3f), %d-NN %.3f (pixels %.3f)",
        metrics["linear_probe_accuracy"] or 0.0,
        metrics["pixel_linear_probe_accuracy"] or 0.0,
        cfg.export.knn_k,
        metrics["knn_accuracy"] or 0.0,
        metrics["pixel_knn_accuracy"] or 0.0,
    )


def cmd_generate(cfg: Config, args: argparse.Namespace) -> None:
    from vae.core.sampler import SAMPLER_FILE
    from vae.data.splits import load_split
    from vae.evaluation.generate import generate
    from vae.mlops.pipeline_run import log_stage
    from vae.training.latent import fit_latent_samplers

    prepared = Path(args.data)
    manifest = _check_prepared(cfg, prepared)
    tracker = _stage_run(cfg, args)
    model, _, device = _load_trained(cfg, args)
    train, val = (load_split(prepared / f"{name}.pt") for name in ("train", "val"))
    out = Path(args.models) / SAMPLER_FILE
    model.latent_sampler, fit = fit_latent_samplers(
        model, train, val, cfg.data.binarize, cfg.generate, out
    )
    log.info(
        "the diffusion sampler: %(active_dims)d active dimensions, noise loss %(train_loss).4f "
        "(validation %(val_loss).4f), fitted in %(seconds).0f s",
        fit,
    )
    test = load_split(prepared / "test.pt", device)
    paths = generate(model, test, cfg.generate, Path(args.out), manifest.get("classes"))
    log_stage(tracker, "generate", {}, _folders(args, reports=args.out))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))


def cmd_classify(cfg: Config, args: argparse.Namespace) -> None:
    from vae.atomic import atomic_write_json
    from vae.data.splits import load_split
    from vae.evaluation.score import FEATURE_NET_FILE, classify, describe_feature_net
    from vae.training.distributed import select_device

    prepared = Path(args.data)
    _check_prepared(cfg, prepared)
    train, test = (load_split(prepared / f"{name}.pt") for name in ("train", "test"))
    out, device = Path(args.models) / FEATURE_NET_FILE, select_device(cfg.train.device)
    try:
        metrics = classify(train, test, cfg.score, cfg.data.dataset, out, device)
    except ValueError as exc:  # the shipped network's file is not the one shipped
        raise StageError(str(exc)) from None
    atomic_write_json(Path(args.metrics) / "classifier.json", metrics)
    (log.warning if "skipped" in metrics else log.info)(describe_feature_net(metrics))


def cmd_score(cfg: Config, args: argparse.Namespace) -> None:
    from vae.data.splits import load_split
    from vae.evaluation.score import FEATURE_NET_FILE, score_stage
    from vae.evaluation.summary import write_record
    from vae.mlops.pipeline_run import log_stage

    prepared, models = Path(args.data), Path(args.models)
    _check_prepared(cfg, prepared)
    tracker = _stage_run(cfg, args)
    model, _, _ = _load_trained(cfg, args)
    if not (models / FEATURE_NET_FILE).is_file():
        raise StageError(f"{models / FEATURE_NET_FILE}: not found; run `vae classify` first")
    train, test = (load_split(prepared / f"{name}.pt") for name in ("train", "test"))
    result = score_stage(model, models, train, test, cfg.data.binarize, cfg.score)
    write_record(Path(args.metrics), "quality.json", result)
    log_stage(tracker, "score", result, _folders(args), (cfg, prepared))
    for name, m in result.get("sets", {}).items():
        log.info(
            "%-20s fid %8.2f  precision %.3f  recall %.3f",
            name,
            m["fid"],
            m["precision"],
            m["recall"],
        )


def cmd_register(cfg: Config, args: argparse.Namespace) -> None:
    from vae.atomic import atomic_write_json
    from vae.mlops.pipeline_run import log_stage
    from vae.mlops.publish import not_registered, publish

    out = Path(args.metrics) / "registry.json"
    name = cfg.mlflow.registered_model
    if not cfg.mlflow.enabled:
        reason = "mlflow.enabled is false; nothing registered"
        atomic_write_json(out, not_registered(name, reason))
        log.info("mlflow.enabled is false: not registering")
        return
    prepared = Path(args.data)
    manifest = _check_prepared(cfg, prepared)
    tracker = _stage_run(cfg, args)
    if tracker is None:
        raise StageError(
            f"{Path(args.models) / RUN_FILE}: no MLflow run; run `vae train` with "
            "mlflow.enabled: true first"
        )
    model, _, _ = _load_trained(cfg, args)
    model.latent_sampler = _chosen_sampler(Path(args.models))
    folders = _folders(args)
    decision = publish(cfg, model, tracker.run_id, manifest, prepared, folders, tracker.model_id)
    atomic_write_json(out, decision)
    log_stage(tracker, "register", decision, folders)


def cmd_log_run(cfg: Config, args: argparse.Namespace) -> None:
    """Re-send the local records of the last pipeline run to MLflow (after a tracking outage):
    the per-epoch rows, and every stage's record of :data:`STAGE_RECORDS` that is there."""
    from vae.atomic import load_json
    from vae.mlops.pipeline_run import log_stage, relog_history, start_pipeline_run

    if not cfg.mlflow.enabled:
        raise StageError("mlflow.enabled is false; nothing to log")
    manifest = _check_prepared(cfg, Path(args.data))
    metrics, folders = Path(args.metrics), _folders(args)
    device = load_json(metrics / "train.json").get("device", "unknown")
    data = (cfg, Path(args.data))
    tracker = start_pipeline_run(cfg, Path(args.models) / RUN_FILE, manifest, device, data[1])
    assert tracker is not None
    relog_history(tracker, Path(args.plots) / "train.csv")
    for stage, spec in STAGE_RECORDS.items():
        if spec.metrics is not None and (metrics / spec.metrics).is_file():
            record = load_json(metrics / spec.metrics)
            log_stage(tracker, stage, record, folders, data, finish=False)
        elif spec.metrics is None and spec.artifact_paths(folders):
            log_stage(tracker, stage, {}, folders, finish=False)
    tracker.finish()
    if problem := tracker.report():
        raise StageError(problem)
    log.info("logged the local records to MLflow run %s", tracker.run_id)
