"""``python -m pipelines.workpool up``: the team's work pool, automations and deployments.

On the Prefect server of ``PREFECT_API_URL`` (the team's, ``make team-up``), idempotently:

- the process work pool ``vae-process`` (``prefect.yaml``'s);
- with ``--notify-url`` (or ``VAE_NOTIFY_URL``), the webhook block ``vae-notify`` posting to it
  (without, the block an earlier ``up`` saved, if any);
- the automations of ``pipelines/automations.yaml``: zombie runs marked Crashed, and (with a
  webhook) a notification on every failed or crashed vae flow run; one of the same name is
  updated, not duplicated;
- ``prefect deploy --all`` from ``prefect.yaml``, in ``--root``: the deployments, their
  schedule, their concurrency limit and their rerun-on-crash trigger.

Workers then start on each machine with ``python -m pipelines.worker start``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

__all__ = ["AUTOMATIONS", "NOTIFY_BLOCK", "POOL", "apply_automations", "ensure_pool", "up"]

POOL = "vae-process"
NOTIFY_BLOCK = "vae-notify"
AUTOMATIONS = Path(__file__).with_name("automations.yaml")
NOTIFY_AUTOMATION = "vae-notify-failed-runs"


def ensure_pool(name: str = POOL) -> bool:
    """The process work pool ``name``; True if it was created now."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            except ObjectAlreadyExists:  # created meanwhile by another `up`
                return False
            return True


def save_notify_block(url: str) -> UUID:
    """The webhook block ``vae-notify``: POST ``{"subject", "body"}`` as JSON to ``url``."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name=NOTIFY_BLOCK,
        url=url,
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
        # the URL is the operator's (a flag or the environment), so a receiver on the team's
        # own network is allowed; Prefect refuses private addresses by default
        allow_private_urls=True,
    )
    return block.save(NOTIFY_BLOCK, overwrite=True)


def saved_notify_block() -> UUID | None:
    """The id of the ``vae-notify`` block saved by an earlier ``up``, if any."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    try:
        return CustomWebhookNotificationBlock.load(NOTIFY_BLOCK)._block_document_id
    except ValueError:  # no such block
        return None


def load_automations(path: Path, notify_block: UUID | None) -> list[Any]:
    """The automations of ``path``, validated; the notification only with a block."""
    from prefect.events.schemas.automations import AutomationCore

    text = path.read_text()
    specs = yaml.safe_load(text.replace("${NOTIFY_BLOCK_ID}", str(notify_block)))["automations"]
    if notify_block is None:
        specs = [s for s in specs if s["name"] != NOTIFY_AUTOMATION]
    return [AutomationCore.model_validate(spec) for spec in specs]


def apply_automations(path: Path = AUTOMATIONS, notify_block: UUID | None = None) -> list[str]:
    """Create each automation of ``path``, or update the one of its name; ``created``/``updated``
    per name."""
    from prefect.client.orchestration import get_client

    done = []
    with get_client(sync_client=True) as client:
        for automation in load_automations(path, notify_block):
            existing = client.read_automations_by_name(automation.name)
            if existing:
                client.update_automation(existing[0].id, automation)
                for extra in existing[1:]:  # duplicates left by `prefect automation create`
                    client.delete_automation(extra.id)
                done.append(f"{automation.name} updated")
            else:
                client.create_automation(automation)
                done.append(f"{automation.name} created")
    return done


def deploy(root: Path) -> None:
    """``prefect deploy --all`` in ``root``; its output goes to ours."""
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    proc = subprocess.run(cmd, cwd=root, env={**os.environ, "PREFECT_CLI_COLORS": "false"})
    if proc.returncode:
        code = proc.returncode
        raise SystemExit(f"pipelines.workpool: error: prefect deploy --all exited {code}")


def up(root: Path, notify_url: str | None) -> None:
    from prefect.settings import get_current_settings

    if get_current_settings().api.url is None:
        raise SystemExit(
            "pipelines.workpool: error: PREFECT_API_URL is not set; workers need a shared "
            "Prefect server (make team-up, then source its env/writer.env)"
        )
    print(f"work pool {POOL}: {'created' if ensure_pool() else 'exists'}")
    block = save_notify_block(notify_url) if notify_url else saved_notify_block()
    if notify_url:
        print(f"webhook block {NOTIFY_BLOCK}: posts to {notify_url}")
    elif block is not None:
        print(f"no --notify-url: notifications go to the saved {NOTIFY_BLOCK} block")
    else:
        print("no --notify-url (VAE_NOTIFY_URL): failed runs notify nobody")
    for line in apply_automations(AUTOMATIONS, block):
        print(f"automation {line}")
    deploy(root)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.workpool", description=__doc__)
    parser.add_argument("command", choices=("up",))
    parser.add_argument("--root", type=Path, default=Path("."), help="the project (prefect.yaml)")
    parser.add_argument("--notify-url", default=os.environ.get("VAE_NOTIFY_URL"))
    args = parser.parse_args(argv)
    up(args.root.resolve(), args.notify_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
