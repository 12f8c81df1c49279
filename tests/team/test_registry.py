"""Registrations from two machines against one server, and the webhook that tells people.

Two clones (A trained, B pulled) register a better and a worse model at the same moment, round
after round, each as a real ``vae register`` process: the registry lock (a Prefect lease on the
team's Prefect server) makes them take turns, so the champion only ever moves to a better
version, and each move is recorded on the version it moved to. The champion webhook's deliveries
are received on a local listener and their signatures checked.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import dvc, free_port
from tests.team.conftest import TeamProject, clone, start_register

pytestmark = [pytest.mark.team, pytest.mark.slow]
ROUNDS = 5


def _set_nll(root: Path, nll: float) -> None:
    """Pretend this clone's model scored ``nll`` (the gate reads metrics/eval.json)."""
    path = root / "metrics" / "eval.json"
    metrics = json.loads(path.read_text())
    metrics["nll_iw"] = nll
    path.write_text(json.dumps(metrics))


def _finish(proc: subprocess.Popen, root: Path) -> dict:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{root.name}: {err}"
    return json.loads((root / "metrics" / "registry.json").read_text())


@contextlib.contextmanager
def as_user(project: TeamProject, role: str = "writer") -> Iterator[Any]:
    """An MlflowClient of the stack as ``role``: MLflow reads the credentials from the
    environment on every call, so the block runs with that user's variables set."""
    from vae.mlops import store

    env = project.stack.client_env(role)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield store.client(env["MLFLOW_TRACKING_URI"])


class Watcher(threading.Thread):
    """Polls the champion alias with ``client``; ``seen``: every version it named, in order."""

    def __init__(self, client: Any, name: str) -> None:
        super().__init__(daemon=True)
        self.client, self.name, self.seen, self.stop = client, name, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            version = self.client.get_model_version_by_alias(self.name, "champion").version
            if not self.seen or self.seen[-1] != version:
                self.seen.append(version)
            time.sleep(0.2)


@pytest.fixture(scope="module")
def clone_b(team_project: TeamProject, tmp_path_factory: pytest.TempPathFactory) -> Path:
    b = clone(team_project, tmp_path_factory.mktemp("machine-b") / "b")
    dvc(b, "pull", env=team_project.env("writer"))
    return b


def test_two_machines_registering_at_once_never_demote_the_champion(
    team_project: TeamProject, clone_b: Path
) -> None:
    a, b, name = team_project.root, clone_b, team_project.model
    # the writer's environment names the team's Prefect API: the lock holds across machines
    env = team_project.env("writer")
    with as_user(team_project) as client:
        _rounds(client, a, b, name, env)
    _registry_lock_is_free(team_project)


def _rounds(client: Any, a: Path, b: Path, name: str, env: dict) -> None:
    first = client.get_model_version_by_alias(name, "champion")
    base = float(first.tags["nll_iw"]) - 1.0
    watcher = Watcher(client, name)
    watcher.start()
    decisions = []
    try:
        for r in range(ROUNDS):
            # the better model beats the champion; the worse loses even to last round's
            better, worse = base - 10 * r, base - 10 * r + 15
            (good, bad) = (a, b) if r % 2 == 0 else (b, a)
            _set_nll(good, better)
            _set_nll(bad, worse)
            procs = [(start_register(root, env), root) for root in (a, b)]
            decisions += [_finish(proc, root) for proc, root in procs]
        time.sleep(1)
    finally:
        watcher.stop.set()
        watcher.join(10)

    versions = {v.version: v for v in client.search_model_versions(f"name='{name}'")}
    nll = {v: float(mv.tags["nll_iw"]) for v, mv in versions.items() if "nll_iw" in mv.tags}
    final = client.get_model_version_by_alias(name, "champion").version
    assert nll[final] == base - 10 * (ROUNDS - 1) == min(nll.values()), (final, nll)
    promoted = [d for d in decisions if d["promoted"]]
    assert [d["nll_iw"] for d in promoted] == [base - 10 * r for r in range(ROUNDS)], decisions
    # what a consumer polling @champion saw: never a worse version than the one before
    seen = watcher.seen
    assert seen[0] == first.version and seen[-1] == final
    assert all(nll[y] < nll[x] for x, y in itertools.pairwise(seen)), (seen, nll)
    # every move is recorded on the version it moved to: from which run, replacing which
    moved = {str(d["version"]) for d in promoted}
    moves = sorted(
        (mv for mv in versions.values() if mv.version in moved),
        key=lambda mv: mv.tags["champion_since"],
    )
    print(
        f"{len(decisions)} registrations in {ROUNDS} rounds; champion v{first.version} -> v{final}"
    )
    for mv in moves:
        print(
            f"  v{mv.version} nll_iw {nll[mv.version]:.3f} replaced v"
            f"{mv.tags['champion_replaced']} at {mv.tags['champion_since']} (run {mv.run_id})"
        )
    print(f"  seen by a reader polling @champion: {' -> '.join('v' + v for v in seen)}")
    chain = [first.version, *(m.version for m in moves)]
    for before, move in zip(chain, moves, strict=False):
        assert move.tags["champion_replaced"] == before, move.tags
        assert move.tags["champion_from_run"] == move.run_id
        assert nll[move.version] < nll[before]
    assert not any(
        "champion_replaced" in mv.tags
        for v, mv in versions.items()
        if v not in moved and v != first.version
    )


def _registry_lock_is_free(project: TeamProject) -> None:
    """The registrations took the team's Prefect lock, and gave it back."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from vae.locks import registry_lock_name

    settings = temporary_settings({PREFECT_API_URL: project.stack.prefect_url})
    with settings, get_client(sync_client=True) as prefect:
        limit = prefect.read_global_concurrency_limit_by_name(registry_lock_name(project.model))
    assert (limit.limit, limit.active_slots) == (1, 0)


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1 that keeps every delivery (headers, raw body)."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.deliveries.append((dict(self.headers), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/champion"

    def wait_for(self, count: int, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while len(self.deliveries) < count and time.time() < deadline:
            time.sleep(0.2)


def test_the_champion_webhook_fires_signed_when_the_champion_moves(
    team_project: TeamProject,
) -> None:
    from vae.mlops.webhooks import WEBHOOK_NAME, champion_event

    secret, a, name = "a-receiver-secret-1234", team_project.root, team_project.model
    receiver = Receiver()
    try:
        hook_env = {"VAE_CHAMPION_WEBHOOK_SECRET": secret}
        cmd = [sys.executable, "-m", "vae", "champion-webhook", "--url", receiver.url]
        refused = subprocess.run(
            cmd, cwd=a, env=team_project.env("writer", **hook_env), capture_output=True, text=True
        )
        assert refused.returncode == 1 and "denies writer permission" in refused.stderr
        admin = team_project.env("admin", **hook_env)
        made = [
            json.loads(
                subprocess.run(
                    cmd, cwd=a, env=admin, capture_output=True, check=True, text=True
                ).stdout
            )
            for _ in range(2)
        ]
        assert made[1]["created"] is False  # idempotent: the second run updates the first's
        assert made[0]["webhook_id"] == made[1]["webhook_id"]
        with as_user(team_project, "admin") as client:
            hooks = [w for w in client.list_webhooks() if w.name == WEBHOOK_NAME]
        assert len(hooks) == 1
        time.sleep(3)  # the server caches the webhook list for 2 s (MLFLOW_WEBHOOK_CACHE_TTL)

        def ours() -> list[dict | None]:
            events = []
            for headers, body in receiver.deliveries:
                if json.loads(body)["data"].get("name") == name:
                    events.append(champion_event(secret, headers, body, name))
            return events

        with as_user(team_project) as client:
            champion_nll = float(client.get_model_version_by_alias(name, "champion").tags["nll_iw"])
        _set_nll(a, champion_nll - 1)
        better = _finish(start_register(a, team_project.env("writer")), a)
        assert better["promoted"]
        receiver.wait_for(2)  # challenger, then champion
        events = ours()
        assert {"name": name, "version": str(better["version"])} in events, events
        for headers, body in receiver.deliveries[-2:]:
            sig = headers.get("X-MLflow-Signature", "")[:14]
            print(f"delivery {headers.get('X-MLflow-Delivery-Id')} {sig}... verified: {body!r}")
        assert events.count(None) == 1  # the challenger alias: no champion event

        before = len(receiver.deliveries)
        _set_nll(a, champion_nll + 50)
        worse = _finish(start_register(a, team_project.env("writer")), a)
        assert not worse["promoted"]
        receiver.wait_for(before + 1)
        time.sleep(3)
        later = ours()[len(events) :]
        assert later == [None], later  # the worse challenger: no champion event

        headers, body = receiver.deliveries[-1]
        with pytest.raises(ValueError, match="Signature"):
            champion_event(secret, headers, body.replace(b"challenger", b"champion"))
        with pytest.raises(ValueError, match="Signature"):
            champion_event("another-secret", headers, body)
    finally:
        receiver.shutdown()
