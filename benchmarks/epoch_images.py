"""What the per-epoch image grids cost training: the default model, a real MLflow store.

Run it from the project root, after ``vae prepare`` (or ``make pipeline``)::

    python benchmarks/epoch_images.py             # 3 epochs of the default, images every epoch
    python benchmarks/epoch_images.py --epochs 2 --data data/prepared

It trains the default params (``params.yaml``) with ``mlflow.image_every: 1`` into a throw-away
SQLite store and reports, per grid pair: the time the loop spends on it (decoding the draws and
the reconstructions, handing the arrays over), the time the background thread takes to encode
and upload them, and both as a share of the mean epoch. With the default ``image_every`` (5),
the share of training is a fifth of the per-epoch figure. Training runs on the CPU the other
thread shares, so the upload's share is an upper bound of what it takes from the epochs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from vae.data.splits import load_split
from vae.mlops.mlflow_tracker import MlflowTracker
from vae.params import load_params, parse_params
from vae.training.train import train


class TimedTracker(MlflowTracker):
    """Times each image's upload in the background thread."""

    uploads: list[float]

    def log_image(self, key: str, image: Any, step: int) -> None:
        def upload() -> None:
            t0 = time.perf_counter()
            self._safely("log_image", self.client.log_image, self.run_id, image, key=key, step=step)
            self.uploads.append(time.perf_counter() - t0)

        from concurrent.futures import ThreadPoolExecutor

        if self._uploads is None:
            self._uploads = ThreadPoolExecutor(1, thread_name_prefix="mlflow-images")
        self._uploads.submit(upload)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()

    from mlflow import MlflowClient

    raw = load_params(args.params).to_dict()
    raw["train"].update(epochs=args.epochs, device="cpu")
    raw["mlflow"].update(image_every=1)
    cfg = parse_params(raw)
    prepared = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        exp = client.create_experiment("bench", artifact_location=Path(tmp, "art").as_uri())
        tracker = TimedTracker(client, client.create_run(exp).info.run_id)
        tracker.uploads = []
        result = train(
            cfg,
            load_split(prepared / "train.pt"),
            load_split(prepared / "val.pt"),
            out_dir=Path(tmp) / "models",
            tracker=tracker,
        )
        tracker.finish()
        loop = client.get_metric_history(tracker.run_id, "epoch_images_seconds")[-1].value
    epoch = sum(r["seconds"] for r in result.history) / len(result.history)
    pairs = len(result.history)
    in_loop, upload = loop / pairs, sum(tracker.uploads) / pairs
    report = {
        "epochs": pairs,
        "epoch_seconds": epoch,
        "loop_seconds_per_pair": in_loop,
        "upload_seconds_per_pair": upload,
        "loop_share_per_epoch": in_loop / epoch,
        "upload_share_per_epoch": upload / epoch,
        "failures": tracker.failures,
    }
    print(json.dumps(report, indent=2))
    print(
        f"per grid pair: {1000 * in_loop:.1f} ms in the loop ({100 * in_loop / epoch:.2f} % of "
        f"a {epoch:.1f} s epoch), {1000 * upload:.1f} ms uploading in the background "
        f"({100 * upload / epoch:.2f} %)"
    )


if __name__ == "__main__":
    main()
