"""Headless Chromium driven over the Chrome DevTools Protocol on a pipe: no pip packages, no driver.

    with Chromium() as browser:
        tab = browser.open("http://127.0.0.1:PORT/")
        tab.wait_for("Number(document.body.dataset.updates || 0) >= 1", timeout=30)
        png = tab.screenshot()
        assert not tab.errors()

Chromium (Debian's `chromium` package, /usr/bin/chromium) is started with
`--remote-debugging-pipe`: it reads NUL-terminated JSON commands on fd 3 and
writes responses and events on fd 4.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

from tests.support.processes import stop_process

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)
COMMAND_TIMEOUT_S = 30.0


class CDPError(RuntimeError):
    """A DevTools command failed or the browser went away."""


class Chromium:
    """A headless Chromium process with a fresh profile; `close()` ends it by PID."""

    def __init__(self, executable: str = CHROMIUM) -> None:
        if not shutil.which(executable):
            raise FileNotFoundError(f"{executable} not found: install Debian's chromium package")
        self._profile = tempfile.mkdtemp(prefix="tele-page-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_pipes() -> None:
            r, w = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=wire_pipes,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, queue.Queue[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                with self._lock:
                    waiter = self._waiting.pop(message["id"], None) if "id" in message else None
                    if waiter is None:
                        self.events.append(message)
                if waiter is not None:
                    waiter.put(message)
        with self._lock:
            for waiter in self._waiting.values():
                waiter.put({"error": {"message": "browser closed the DevTools pipe"}})
            self._waiting.clear()

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and wait for its result."""
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        answer: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._waiting[message["id"]] = answer
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        try:
            reply = answer.get(timeout=COMMAND_TIMEOUT_S)
        except queue.Empty:
            raise CDPError(f"{method}: no answer within {COMMAND_TIMEOUT_S:.0f}s") from None
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def open(self, url: str, width: int = 1280, height: int = 900) -> Tab:
        """A new tab at `url` with console, log and runtime events recorded."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        tab = Tab(self, session, width, height)
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        tab.resize(height)
        self.send("Page.navigate", {"url": url}, session=session)
        return tab

    def close(self) -> None:
        """End the browser process and remove its profile."""
        stop_process(self.process)
        os.close(self._to_browser)
        self._reader.join(timeout=5)
        os.close(self._from_browser)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tab:
    """One page target, addressed through its flat DevTools session."""

    def __init__(self, browser: Chromium, session: str, width: int, height: int) -> None:
        self.browser = browser
        self.session = session
        self.width = width
        self.height = height

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.send(method, params, session=self.session)

    def resize(self, height: int) -> None:
        """Set the viewport to width x height CSS pixels at device scale 1."""
        self.height = height
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise CDPError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> None:
        """Poll until the expression is truthy in the page."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.evaluate(expression):
                    return
            except CDPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"page: {expression!r} not true within {timeout:.0f}s")
            time.sleep(0.1)

    def rect(self, selector: str) -> dict[str, float]:
        """The element's bounding box in page CSS pixels."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            " return {x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}; })()"
        )
        if not box:
            raise CDPError(f"no element matches {selector!r}")
        return dict(box)

    def screenshot(self, selector: str | None = None, full_page: bool = False) -> bytes:
        """A PNG of the viewport, the whole page, or one element's box."""
        # An element's box may lie below the viewport (the page is taller than the window): capture beyond it.
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page or selector is not None}
        if full_page:
            height = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)"))
            self.resize(height)
        if selector is not None:
            params["clip"] = {**self.rect(selector), "scale": 1}
        return base64.b64decode(self.send("Page.captureScreenshot", params)["data"])

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries (CSP, network) of this tab."""
        found: list[str] = []
        with self.browser._lock:
            events = [e for e in self.browser.events if e.get("sessionId") == self.session]
        for event in events:
            params = event.get("params", {})
            if event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif event["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append("exception: " + str(details.get("exception", {}).get("description", details.get("text"))))
            elif event["method"] == "Log.entryAdded" and params["entry"].get("level") == "error":
                entry = params["entry"]
                found.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".rstrip())
        return found
