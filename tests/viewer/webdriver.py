"""A minimal W3C WebDriver client over urllib: enough to drive headless Chromium through chromedriver."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
"""Without the networking flags Chromium keeps trying to reach Google's hosts, which this machine refuses."""
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"
START_TIMEOUT_S = 20.0


class WebDriverError(RuntimeError):
    pass


class Session:
    """One browser session: navigation, scripts, clicks, screenshots, the browser's console log."""

    def __init__(self, base_url: str, session_id: str) -> None:
        self.base_url, self.session_id = base_url, session_id

    def command(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        return request(self.base_url, method, f"/session/{self.session_id}{path}", payload)

    def navigate(self, url: str) -> None:
        self.command("POST", "/url", {"url": url})

    def execute(self, script: str, *args: Any) -> Any:
        return self.command("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout_s: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.execute(script)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.05)

    def find(self, css: str) -> str:
        return self.command("POST", "/element", {"using": "css selector", "value": css})[ELEMENT_KEY]

    def click(self, css: str) -> None:
        self.command("POST", f"/element/{self.find(css)}/click", {})

    def wheel(self, css: str, delta_y: int) -> None:
        """Turn the mouse wheel over the element's centre."""
        origin = {ELEMENT_KEY: self.find(css)}
        self.command("POST", "/actions", {"actions": [{"type": "wheel", "id": "wheel", "actions": [
            {"type": "scroll", "x": 0, "y": 0, "deltaX": 0, "deltaY": delta_y, "origin": origin}]}]})

    def screenshot(self) -> bytes:
        return base64.b64decode(self.command("GET", "/screenshot"))

    def console_log(self) -> list[dict[str, Any]]:
        """Console messages and failed loads since the last call (chromedriver's log endpoint)."""
        return self.command("POST", "/se/log", {"type": "browser"})


def request(base_url: str, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(base_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return json.loads(response.read())["value"]
    except urllib.error.HTTPError as error:
        raise WebDriverError(f"{method} {path}: {error.code} {error.read()[:500]!r}") from error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def chromium_session(profile_dir: Path, window: tuple[int, int] = (1400, 900)) -> Iterator[Session]:
    """chromedriver on a free loopback port and one headless Chromium session with a fresh profile."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until_ready(base_url)
        options = {"binary": CHROMIUM, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}",
                                                f"--window-size={window[0]},{window[1]}"]}
        created = request(base_url, "POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options, "goog:loggingPrefs": {"browser": "ALL"}}}})
        session = Session(base_url, created["sessionId"])
        try:
            yield session
        finally:
            with contextlib.suppress(WebDriverError, OSError):
                request(base_url, "DELETE", f"/session/{session.session_id}")
    finally:
        driver.terminate()
        driver.wait(timeout=10)


def _wait_until_ready(base_url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if request(base_url, "GET", "/status").get("ready"):
                return
        except (OSError, WebDriverError):
            pass
        if time.monotonic() > deadline:
            raise WebDriverError(f"chromedriver did not start within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.1)
