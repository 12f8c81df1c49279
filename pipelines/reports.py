"""What the flows leave in Prefect: the retraining report, and a note on every failure or crash.

``vae-retrain-report`` (markdown) gives the decision, links to the MLflow run and its sample
grid, and champion vs challenger test metrics; ``vae-retrain-metrics`` is that comparison as a
table artifact (:func:`metrics_table`), and with a tracking server ``vae-retrain-samples`` shows
the sample grid itself, by its MLflow URL. ``vae-flow-failure`` (markdown) is written by the
``on_failure`` and ``on_crashed`` hooks of both flows: what failed, the error, and where the
logs are (the Prefect UI, ``prefect flow-run logs``, and each stage's log file).
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

__all__ = [
    "FAILURE_KEY",
    "REPORT_KEY",
    "failure_markdown",
    "metrics_table",
    "mlflow_links",
    "report_failure",
    "retrain_markdown",
    "stage_log_dir",
]

REPORT_KEY = "vae-retrain-report"
TABLE_KEY = "vae-retrain-metrics"
SAMPLES_KEY = "vae-retrain-samples"
FAILURE_KEY = "vae-flow-failure"
METRICS = ("nll_iw", "elbo", "recon", "kl", "elbo_gap", "bits_per_dim", "active_units")
TITLES = {
    "skipped": "skipped",
    "unchanged": "nothing to retrain",
    "promoted": "challenger promoted",
    "kept": "champion kept",
    "not registered": "experiment not registered",
}
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store


def stage_log_dir(root: str | Path, flow_run_name: str) -> Path:
    """Where a flow run's stages write their full output: ``<root>/logs/<flow run name>/``."""
    return Path(root) / "logs" / flow_run_name


def mlflow_links(uri: str, experiment_id: str, run_id: str, artifact_uri: str) -> dict[str, str]:
    """Links to an MLflow run's page and its sample grid (``generate/samples.png``).

    A server's own UI serves both. A local store (SQLite) has no UI until ``mlflow ui`` is
    started, so the run link assumes its default address and the grid links to the file.
    """
    samples = "generate/samples.png"
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        query = urllib.parse.urlencode({"path": samples, "run_uuid": run_id})
        return {
            "run": f"{base}/#/experiments/{experiment_id}/runs/{run_id}",
            "samples": f"{base}/get-artifact?{query}",
            "how": f"MLflow server {base}",
        }
    return {
        "run": f"{LOCAL_UI}/#/experiments/{experiment_id}/runs/{run_id}",
        "samples": f"{artifact_uri.rstrip('/')}/{samples}",
        "how": f"start the UI with `mlflow ui --backend-store-uri {uri}`",
    }


def _cell(mv: dict[str, Any] | None, metric: str) -> str:
    value = mv["tags"].get(metric) if mv else None
    if value is None:
        return "-"
    try:
        return f"{float(value):.3f}" if metric != "active_units" else str(int(float(value)))
    except ValueError:
        return str(value)


def metrics_table(
    champion: dict[str, Any] | None, challenger: dict[str, Any] | None
) -> list[dict[str, str]]:
    """One row per test metric: its champion and challenger values (``-`` where there is none),
    each column named by its version."""
    cols = [("champion", champion), ("challenger", challenger)]
    names = [f"{label} v{mv['version']}" if mv else label for label, mv in cols]
    return [
        {"metric": metric, **{n: _cell(mv, metric) for n, (_, mv) in zip(names, cols, strict=True)}}
        for metric in METRICS
    ]


def retrain_markdown(
    result: dict[str, Any],
    champion: dict[str, Any] | None,
    challenger: dict[str, Any] | None,
    links: dict[str, str] | None,
) -> str:
    """The report: decision, reason, links to the run and its samples, metrics side by side."""
    now = result["champion_version"]
    lines = [
        f"## vae-retrain: {TITLES[result['status']]}",
        "",
        f"**Decision:** {result['status']}. **Reason:** {result['reason']}.",
        "",
        f"Dataset sha256: `{result['dataset_sha256']}`. "
        f"Champion now: {f'v{now}' if now is not None else 'none'}.",
        "",
    ]
    if result.get("experiment"):
        lines += [f"DVC experiment: `{result['experiment']}` (`dvc exp show`).", ""]
    if links:
        lines += [
            f"MLflow run: [{result['run_id']}]({links['run']}) ({links['how']}). "
            f"Sample grid: [generate/samples.png]({links['samples']}).",
            "",
        ]
    rows = metrics_table(champion, challenger)
    header = " | ".join(list(rows[0])[1:])
    lines += [f"| metric (test) | {header} |", "| --- | ---: | ---: |"]
    lines += [f"| {' | '.join(row.values())} |" for row in rows]
    return "\n".join(lines) + "\n"


def failure_markdown(
    flow_name: str,
    flow_run: Any,
    state: Any,
    failed_tasks: list[str],
    ui_url: str | None,
    log_dir: Path | None,
) -> str:
    what = "crashed" if state.is_crashed() else "failed"
    lines = [
        f"## {flow_name} {what}: flow run `{flow_run.name}`",
        "",
        f"**State:** {state.name}. **Message:** {state.message or '(none)'}",
        "",
        f"**Tasks that did not complete:** {', '.join(failed_tasks) or 'none'}.",
        "",
        "**Logs:**",
        f"- `prefect flow-run logs {flow_run.id}`",
    ]
    if ui_url:
        lines.append(f"- the Prefect UI: [{flow_run.name}]({ui_url})")
    if log_dir is not None:
        lines.append(f"- each stage's full output: `{log_dir}/<stage>.log`")
    return "\n".join(lines) + "\n"


def report_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_failure`` / ``on_crashed`` hook: publish :data:`FAILURE_KEY` for this flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.utilities.urls import url_for

    root = (flow_run.parameters or {}).get("root")
    log_dir = stage_log_dir(Path(root).resolve(), flow_run.name) if root else None
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
        failed = [  # failed, crashed, or still running when the flow run ended
            f"{r.name} ({r.state.name})"
            for r in sorted(runs, key=lambda r: r.expected_start_time)
            if r.state is not None and not r.state.is_completed()
        ]
        markdown = failure_markdown(flow.name, flow_run, state, failed, url_for(flow_run), log_dir)
        client.create_artifact(
            ArtifactCreate(
                key=FAILURE_KEY,
                type="markdown",
                data=markdown,
                description=f"{flow.name}: what failed and where its logs are",
                flow_run_id=flow_run.id,
            )
        )
