"""What a person sees, in a real browser: a tiny pipeline run against a real MLflow server, then
headless Chromium opens the run, the registered version's page and the model card in the UI.

It writes a screenshot of each under ``build/screenshots/`` of this clone and prints their
paths. Without Chromium it skips (``make browser`` installs it); with ``CI=true`` it fails.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    dvc,
    free_port,
    make_dvc_project,
    start_server,
    stop_server,
    subprocess_env,
    tracking_server_args,
    write_idx_dataset,
)
from tests.e2e.browser import Browser, require_browser

pytestmark = pytest.mark.slow  # processes, servers or real training: CI runs these

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "build" / "screenshots"
NAME = "tiny-vae"

# In the card's frame: every image decoded and not one flat colour, and the metrics table.
CHECK_CARD = """
const imgs = Array.from(document.images);
if (!imgs.length || !imgs.every(i => i.complete && i.naturalWidth > 0)) return null;
const spread = imgs.map(i => {
  const c = document.createElement('canvas');
  c.width = i.naturalWidth; c.height = i.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(i, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let lo = 255, hi = 0;
  for (let k = 0; k < d.length; k += 4) { lo = Math.min(lo, d[k]); hi = Math.max(hi, d[k]); }
  return hi - lo;
});
const rows = Array.from(document.querySelectorAll('table tr th')).map(t => t.innerText);
return {n: imgs.length, spread: spread, rows: rows, title: document.title};
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A tracking server and one tiny `dvc repro` that logged and registered into it."""
    require_browser()
    base = tmp_path_factory.mktemp("browser")
    port = free_port()
    env = subprocess_env()
    server = start_server(
        tracking_server_args(port, base / "server"), f"http://127.0.0.1:{port}/health", base, env
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        source = write_idx_dataset(base / "source", n_train=200, n_test=50)
        root = make_dvc_project(base / "proj", source, mlflow={"enabled": True})
        dvc(root, "repro", env=subprocess_env(MLFLOW_TRACKING_URI=uri))
        record = json.loads((root / "models" / "mlflow_run.json").read_text())
        yield {"uri": uri, "run": record["run_id"], "exp": record["experiment_id"]}
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def browser(served: dict[str, str]) -> Iterator[Browser]:
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def _shot(browser: Browser, name: str) -> None:
    path = browser.screenshot(SHOTS / f"{name}.png")
    print(f"screenshot: {path}", file=sys.stderr)


def test_the_run_page_shows_the_run(browser: Browser, served: dict[str, str]) -> None:
    browser.go(f"{served['uri']}/#/experiments/{served['exp']}/runs/{served['run']}")
    browser.wait_for(
        "return document.body.innerText.includes('Parameters') && "
        "document.body.innerText.includes('fashion_mnist-train')",
        what="the run page with its parameters and datasets",
    )
    _shot(browser, "run")


def test_the_version_page_links_the_card(browser: Browser, served: dict[str, str]) -> None:
    browser.go(f"{served['uri']}/#/models/{NAME}/versions/1")
    browser.wait_for(
        "return document.body.innerText.includes('Model card')", what="the version's description"
    )
    _shot(browser, "version")


def test_the_card_renders_in_the_artifact_view(browser: Browser, served: dict[str, str]) -> None:
    path = "card/model_card_v1.html"
    browser.go(
        f"{served['uri']}/#/experiments/{served['exp']}/runs/{served['run']}/artifacts/{path}"
    )
    frame = browser.wait_for(
        "return document.querySelector('iframe') ? true : null", what="the card's frame"
    )
    assert frame
    browser.frame(browser.find("iframe"))
    try:
        card = browser.wait_for(f"{CHECK_CARD}", what="the card's images decoded")
    finally:
        browser.frame(None)
    assert card["n"] == 5, card  # samples, reconstructions, interpolations, latent map, curves
    assert all(s > 8 for s in card["spread"]), f"a blank image: {card['spread']}"
    assert any("log p(x)" in r for r in card["rows"]) and "metric" in card["rows"], card["rows"]
    _shot(browser, "model_card")


def test_images_are_logged_at_more_than_one_step(served: dict[str, str]) -> None:
    r = httpx.get(
        f"{served['uri']}/api/2.0/mlflow/artifacts/list",
        params={"run_id": served["run"], "path": "images"},
        timeout=30,
    )
    files = [f["path"] for f in r.json()["files"]]
    steps = {p.split("+step+")[1].split("+")[0] for p in files if p.startswith("images/samples+")}
    assert len(steps) > 1, files
