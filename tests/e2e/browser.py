"""A headless Chromium driven through the system ChromeDriver's W3C WebDriver API, with httpx.

No Selenium: nothing downloads a driver or a browser at test time. Chromium runs as root with
``--no-sandbox``, a temporary profile, and background networking off (this machine's network is
closed; without those flags Chromium keeps trying Google's hosts).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


def require_browser() -> None:
    """Skip with one line when Chromium or its driver is missing; fail under ``CI=true``."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not missing:
        return
    why = (
        f"{', '.join(missing)} missing: `make browser` installs Debian's chromium, chromium-driver"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {why}")
    pytest.skip(why)


class Browser:
    """One ChromeDriver process and one browser session."""

    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        self.profile = tempfile.mkdtemp(prefix="vae-chromium-")
        port = free_port()
        self.driver = subprocess.Popen(
            [str(CHROMEDRIVER), f"--port={port}", "--allowed-ips=127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.2)
        args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}",
        ]
        caps = {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": str(CHROMIUM), "args": args},
        }
        value = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        self.session = f"/session/{value['sessionId']}"

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        r = self.http.request(method, path, json=body)
        payload = r.json()
        if r.status_code != 200:
            raise RuntimeError(f"{method} {path}: {payload.get('value', payload)}")
        return payload["value"]

    def go(self, url: str) -> None:
        self._call("POST", f"{self.session}/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        return self._call(
            "POST", f"{self.session}/execute/sync", {"script": script, "args": list(args)}
        )

    def wait_for(self, script: str, timeout: float = 60.0, what: str = "") -> Any:
        """Poll ``script`` (a function body that returns a value) until it returns a truthy one."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.js("return document.body ? document.body.innerText.slice(0, 800) : ''")
                raise AssertionError(f"timed out waiting for {what or script!r}; page: {text!r}")
            time.sleep(0.5)

    def find(self, css: str) -> dict[str, str]:
        return self._call(
            "POST", f"{self.session}/element", {"using": "css selector", "value": css}
        )

    def frame(self, element: dict[str, str] | None) -> None:
        """Into the frame ``element`` (from :meth:`find`), or back to the top with None."""
        self._call("POST", f"{self.session}/frame", {"id": element})

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", f"{self.session}/screenshot")))
        return path

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, httpx.HTTPError, AttributeError):
            self._call("DELETE", self.session)
        self.driver.terminate()
        try:
            self.driver.wait(10)
        except subprocess.TimeoutExpired:
            self.driver.kill()
        self.http.close()
        shutil.rmtree(self.profile, ignore_errors=True)
