"""What a Prefect server recorded of a flow run: its task runs, its artifacts, its reports.

Prefect reads its settings when it is first imported, so these helpers import it (and
``pipelines``) only when called, inside tests that run under ``prefect_env`` (conftest.py).
"""

from __future__ import annotations

import time
from typing import Any


def _task_runs(flow_state: Any, expected: int) -> list[Any]:
    """The flow run's task runs, oldest first, once the server has all of them in a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    deadline = time.time() + 30
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            done = [r for r in runs if r.state is not None and r.state.is_final()]
            if len(done) >= expected or time.time() > deadline:
                return sorted(runs, key=lambda r: r.start_time or r.expected_start_time)
            time.sleep(0.5)


def _artifacts(flow_run_id: Any) -> dict[str, Any]:
    """``{key: artifact}`` of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def _report(flow_state: Any) -> str:
    from pipelines.flows import REPORT_KEY

    artifact = _artifacts(flow_state.state_details.flow_run_id)[REPORT_KEY]
    assert artifact.type == "markdown"
    return str(artifact.data)


def _failure(state: Any) -> str:
    from pipelines.reports import FAILURE_KEY

    return str(_artifacts(state.state_details.flow_run_id)[FAILURE_KEY].data)
