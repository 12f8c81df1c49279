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
    from vae.core.sampler import GaussianMixture
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
    from vae.mlops.mlflow_tracker import tracker_from_run_file

    return tracker_from_run_file(Path(args.models) / RUN_FILE)


def _folders(args: argparse.Namespace, **override: str) -> dict[str, Path]:
    """The command's output folders, by the names :data:`STAGE_RECORDS` uses."""
    default = {"metrics": METRICS, "plots": PLOTS, "reports": REPORTS, "models": MODELS}
    return {k: Path(override.get(k) or getattr(args, k, None) or v) for k, v in default.items()}


def _log(tracker: MlflowTracker | None, stage: str, record: dict, folders: dict[str, Path]) -> None:
    """Log the stage's record into the pipeline's run, as :data:`STAGE_RECORDS` says."""
    from vae.mlops.mlflow_tracker import log_stage

    spec = STAGE_RECORDS[stage]
    log_stage(tracker, stage, spec.logged_metrics(record), spec.artifact_paths(folders))


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
    from vae.mlops.mlflow_tracker import start_pipeline_run
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
            tracker = start_pipeline_run(cfg, Path(args.models) / RUN_FILE, manifest, device)
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
            _write_training_outputs(result, args, tracker)
    finally:
        distributed.shutdown()


def _write_training_outputs(
    result: TrainResult, args: argparse.Namespace, tracker: MlflowTracker | None
) -> None:
    from vae.atomic import atomic_write_csv, atomic_write_json

    atomic_write_json(Path(args.metrics) / "train.json", result.metrics)
    atomic_write_csv(Path(args.plots) / "train.csv", result.history)
    if tracker is not None:
        _log(tracker, "train", result.metrics, _folders(args))
        tracker.finish()
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


def _chosen_sampler(models: Path) -> GaussianMixture | None:
    """The mixture ``vae generate`` fitted, if ``generate.sampler`` chose it; else the prior."""
    from vae.core.sampler import SAMPLER_FILE, load_sampler

    if not (models / SAMPLER_FILE).is_file():  # `vae register` straight after `vae train`
        log.warning(
            "%s: missing, so the registered model samples from the prior; run `vae generate` "
            "first to register the sampler generate.sampler chooses",
            models / SAMPLER_FILE,
        )
        return None
    kind, gmm = load_sampler(models / SAMPLER_FILE)
    return gmm if kind == "gmm" else None


def cmd_evaluate(cfg: Config, args: argparse.Namespace) -> None:
    from vae.atomic import atomic_write_json
    from vae.data.splits import float_images, load_split
    from vae.evaluation.evaluate import evaluate

    prepared = Path(args.data)
    _check_prepared(cfg, prepared)
    tracker = _stage_run(cfg, args)
    model, _, device = _load_trained(cfg, args)
    test = load_split(prepared / "test.pt", device)
    metrics = evaluate(
        model, float_images(test, cfg.data.binarize, cfg.evaluate.seed), cfg.evaluate
    )
    atomic_write_json(Path(args.metrics) / "eval.json", metrics)
    _log(tracker, "evaluate", metrics, _folders(args))
    log.info(
        "test -ELBO %.2f, -log p(x) ~ %.2f (K=%d), gap %.2f nats; %d active units",
        -metrics["elbo"],
        metrics["nll_iw"],
        metrics["iw_samples"],
        metrics["elbo_gap"],
        metrics["active_units"],
    )


def cmd_export(cfg: Config, args: argparse.Namespace) -> None:
    from vae.atomic import atomic_write_json
    from vae.data.splits import load_split
    from vae.evaluation.export import export

    prepared = Path(args.data)
    _check_prepared(cfg, prepared)
    tracker = _stage_run(cfg, args)
    model, _, device = _load_trained(cfg, args)
    splits = {
        name: load_split(prepared / f"{name}.pt", device) for name in ("train", "val", "test")
    }
    metrics = export(model, splits, cfg.data.binarize, cfg.export, Path(args.out))
    atomic_write_json(Path(args.metrics) / "downstream.json", metrics)
    _log(tracker, "export", metrics, _folders(args))
    log.info(
        "linear probe %.3f (pixels %.3f), %d-NN %.3f (pixels %.3f)",
        metrics["linear_probe_accuracy"] or 0.0,
        metrics["pixel_linear_probe_accuracy"] or 0.0,
        cfg.export.knn_k,
        metrics["knn_accuracy"] or 0.0,
        metrics["pixel_knn_accuracy"] or 0.0,
    )


def cmd_generate(cfg: Config, args: argparse.Namespace) -> None:
    from vae.atomic import atomic_write_with
    from vae.core.sampler import SAMPLER_FILE, save_sampler
    from vae.data.splits import load_split
    from vae.evaluation.generate import fit_latent_sampler, generate

    prepared = Path(args.data)
    manifest = _check_prepared(cfg, prepared)
    tracker = _stage_run(cfg, args)
    model, _, device = _load_trained(cfg, args)
    gmm = fit_latent_sampler(
        model, load_split(prepared / "train.pt"), cfg.data.binarize, cfg.generate
    )
    sampler = Path(args.models) / SAMPLER_FILE
    atomic_write_with(sampler, lambda tmp: save_sampler(tmp, cfg.generate.sampler, gmm))
    model.latent_sampler = gmm if cfg.generate.sampler == "gmm" else None
    paths = generate(
        model,
        load_split(prepared / "test.pt", device),
        cfg.generate,
        Path(args.out),
        class_names=manifest.get("classes"),
    )
    _log(tracker, "generate", {}, _folders(args, reports=args.out))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))


def cmd_classify(cfg: Config, args: argparse.Namespace) -> None:
    from vae.atomic import atomic_write_json
    from vae.data.splits import load_split
    from vae.evaluation.score import classify, save_classifier
    from vae.training.distributed import select_device

    prepared = Path(args.data)
    _check_prepared(cfg, prepared)
    train, test = (load_split(prepared / f"{name}.pt") for name in ("train", "test"))
    net, metrics = classify(train, test, cfg.score, select_device(cfg.train.device))
    save_classifier(Path(args.models) / "classifier.pt", net, metrics)
    atomic_write_json(Path(args.metrics) / "classifier.json", metrics)
    if net is None:
        log.warning("no feature classifier: %s; `vae score` will skip", metrics["skipped"])
    else:
        log.info("feature classifier: test accuracy %.4f", metrics["test_accuracy"] or 0.0)


def cmd_score(cfg: Config, args: argparse.Namespace) -> None:
    from vae.atomic import atomic_write_json
    from vae.core.sampler import SAMPLER_FILE, load_sampler
    from vae.data.splits import load_split
    from vae.evaluation.score import load_classifier, score

    prepared, models = Path(args.data), Path(args.models)
    _check_prepared(cfg, prepared)
    tracker = _stage_run(cfg, args)
    model, _, device = _load_trained(cfg, args)
    net, classifier = load_classifier(models / "classifier.pt", device)
    out = Path(args.metrics) / "quality.json"
    if net is None:
        result: dict = {"skipped": classifier["skipped"]}
    else:
        kind, gmm = load_sampler(models / SAMPLER_FILE)
        train, test = (load_split(prepared / f"{name}.pt") for name in ("train", "test"))
        result = score(model, gmm, net, train, test, cfg.data.binarize, cfg.score)
        result.update(sampler=kind, classifier_test_accuracy=classifier["test_accuracy"])
    atomic_write_json(out, result)
    _log(tracker, "score", result, _folders(args))
    for name, m in result.get("sets", {}).items():
        log.info(
            "%-15s fid %8.2f  precision %.3f  recall %.3f",
            name,
            m["fid"],
            m["precision"],
            m["recall"],
        )


def cmd_register(cfg: Config, args: argparse.Namespace) -> None:
    from vae.atomic import atomic_write_json
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
    decision = publish(cfg, model, tracker.run_id, manifest, Path(args.data), Path(args.metrics))
    atomic_write_json(out, decision)
    _log(tracker, "register", decision, _folders(args))


def cmd_log_run(cfg: Config, args: argparse.Namespace) -> None:
    """Re-send the local records of the last pipeline run to MLflow (after a tracking outage):
    the per-epoch rows, and every stage's record of :data:`STAGE_RECORDS` that is there."""
    from vae.atomic import load_json
    from vae.mlops.mlflow_tracker import relog_history, start_pipeline_run

    if not cfg.mlflow.enabled:
        raise StageError("mlflow.enabled is false; nothing to log")
    manifest = _check_prepared(cfg, Path(args.data))
    metrics, folders = Path(args.metrics), _folders(args)
    device = load_json(metrics / "train.json").get("device", "unknown")
    tracker = start_pipeline_run(cfg, Path(args.models) / RUN_FILE, manifest, device)
    assert tracker is not None
    relog_history(tracker, Path(args.plots) / "train.csv")
    for stage, spec in STAGE_RECORDS.items():
        if spec.metrics is not None and (metrics / spec.metrics).is_file():
            _log(tracker, stage, load_json(metrics / spec.metrics), folders)
        elif spec.metrics is None and spec.artifact_paths(folders):
            _log(tracker, stage, {}, folders)
    tracker.finish()
    if problem := tracker.report():
        raise StageError(problem)
    log.info("logged the local records to MLflow run %s", tracker.run_id)
