"""Real Prometheus, Alertmanager and a webhook receiver for tests, on 127.0.0.1.

Debian's binaries (`apt-get install prometheus prometheus-alertmanager`) run on free
ports with their data in temporary directories; readiness is polled on /-/ready and
they are killed by PID. Missing binaries fail loudly (CI installs them), never skip.

    with WebhookReceiver() as hook, start_alertmanager(alertmanager_config(hook.url)) as am:
        with start_prometheus(prometheus_config(["127.0.0.1:9842"], am.address),
                              rule_files=[...]) as prom:
            prom.query('up{job="tele"}')            # -> list of result dicts
            hook.wait_for(lambda n: ..., timeout=120)  # -> the matching notification
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from .processes import stop_process

PROMETHEUS = "prometheus"
ALERTMANAGER = "prometheus-alertmanager"
PROMTOOL = "promtool"
AMTOOL = "amtool"
READY_TIMEOUT_S = 30.0


def binary(name: str) -> str:
    """Absolute path of a required binary; fails with an install hint when missing."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        raise RuntimeError(
            f"{name!r} not found on PATH. Install Debian's Prometheus stack: "
            "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager"
        )
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bindable(port: int) -> bool:
    """Whether a TCP port on 127.0.0.1 can be bound now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def http_get(url: str, timeout: float = 5.0) -> bytes:
    """GET `url` and return the body; raises on HTTP errors."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def poll(check: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Call `check` until it returns something truthy; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError) as exc:
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout:.0f}s (last error: {last_error})")


@dataclass
class Running:
    """A started server process; stop() kills it by PID and removes its temp dir."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log_path: Path
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """host:port, for configs."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:41234."""
        return f"http://{self.address}"

    def log(self) -> str:
        """Everything the process wrote so far (for failure messages)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def api(self, path: str, **params: str) -> Any:
        """GET an /api/v1 or /api/v2 endpoint and return its decoded JSON."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return json.loads(http_get(f"{self.url}{path}{query}"))

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Prometheus instant query; the result vector (list of {metric, value})."""
        body = self.api("/api/v1/query", query=promql)
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {body}")
        return list(body["data"]["result"])

    def settled_at(self, targets: int) -> float | None:
        """Now, once its data is final: every one of `targets` scraped after it, and up then; None if one was not.

        A scrape that starts before a time and times out (a loaded machine) writes its stale markers
        at its start, so the data at a time is final only after a later scrape of every target.
        """
        at = time.time()
        poll(
            lambda: len(self.query(f"timestamp(up) > {at}")) == targets,
            timeout=60,
            interval=0.5,
            what="a scrape of every target after the evaluation time",
        )
        body = self.api("/api/v1/query", query="up == 1", time=f"{at:.3f}")
        return at if len(body["data"]["result"]) == targets else None

    def alerts(self) -> list[dict[str, Any]]:
        """Prometheus' active (pending and firing) alerts."""
        return list(self.api("/api/v1/alerts")["data"]["alerts"])

    def reload(self) -> None:
        """Ask the server to re-read its config (SIGHUP)."""
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """Kill by PID, wait, and delete the temp dir; idempotent."""
        stop_process(self.process)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Exited(Exception):
    """A server process ended while we waited for it to become ready."""


def _start(name: str, argv_for: Callable[[Path, int], list[str]], workdir_files: dict[str, str]) -> Running:
    """Write files into a fresh temp dir, start argv on a free port, poll /-/ready."""
    tmp = tempfile.TemporaryDirectory(prefix=f"tele-{name}-")
    workdir = Path(tmp.name)
    for rel, text in workdir_files.items():
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_text(text, encoding="utf-8")
    log_path = workdir / f"{name}.log"
    for _attempt in range(3):
        port = free_port()
        with log_path.open("wb") as log:
            process = subprocess.Popen(argv_for(workdir, port), stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        running = Running(name, process, port, workdir, log_path, tmp)

        def ready(r: Running = running) -> bool:
            if r.process.poll() is not None:
                raise _Exited(f"{name} exited with {r.process.returncode}")
            return bool(http_get(f"{r.url}/-/ready", timeout=2) is not None)

        try:
            poll(ready, READY_TIMEOUT_S, what=f"{name} ready")
            return running
        except (TimeoutError, _Exited):
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            if "address already in use" not in running.log():
                break
    message = f"{name} did not become ready on 127.0.0.1:{port}:\n{log_path.read_text(errors='replace')}"
    tmp.cleanup()
    raise RuntimeError(message)


def start_prometheus(config_text: str, rule_files: Sequence[Path] = ()) -> Running:
    """Start Prometheus with `config_text` as prometheus.yml.

    Each rule file is copied into the temp dir as rules/<name>; the config should
    list `rule_files: [rules/*.yml]` (prometheus_config() does).
    """
    files = {"prometheus.yml": config_text}
    files.update({f"rules/{Path(p).name}": Path(p).read_text(encoding="utf-8") for p in rule_files})

    def argv(workdir: Path, port: int) -> list[str]:
        return [
            binary(PROMETHEUS),
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]

    return _start("prometheus", argv, files)


def start_alertmanager(config_text: str) -> Running:
    """Start Alertmanager with `config_text` as alertmanager.yml; clustering is off."""

    def argv(workdir: Path, port: int) -> list[str]:
        return [
            binary(ALERTMANAGER),
            f"--config.file={workdir / 'alertmanager.yml'}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ]

    return _start("alertmanager", argv, {"alertmanager.yml": config_text})


def prometheus_config(
    targets: Sequence[str],
    alertmanager: str | None = None,
    job: str = "tele",
    interval: str = "1s",
    evaluation_interval: str | None = None,
) -> str:
    """A prometheus.yml scraping `targets` as `job` every `interval` (which is also the scrape timeout),
    evaluating rules/*.yml every `evaluation_interval` (default: `interval`), alerting to `alertmanager`."""
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": evaluation_interval or interval,
        },
        "rule_files": ["rules/*.yml"],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
    }
    if alertmanager is not None:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return yaml.safe_dump(config, sort_keys=False)


def alertmanager_config(webhook_url: str, base: Path | None = None, group_wait: str = "1s") -> str:
    """An alertmanager.yml: `base` (default: the repo's) with every receiver sent to `webhook_url`
    and short group_wait/group_interval, so tests see notifications within seconds."""
    source = base or Path(__file__).resolve().parents[2] / "prometheus" / "alertmanager.yml"
    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    for receiver in config.get("receivers", []):
        if receiver.get("webhook_configs"):
            for hook in receiver["webhook_configs"]:
                hook["url"] = webhook_url
    routes = [config["route"], *config["route"].get("routes", [])]
    for route in routes:
        route["group_wait"] = group_wait
        route["group_interval"] = group_wait
    config["route"]["repeat_interval"] = "1h"
    return yaml.safe_dump(config, sort_keys=False)


@dataclass
class Notification:
    """One alert out of a webhook payload, with the time it arrived (time.time())."""

    received_at: float
    status: str
    labels: dict[str, str]
    annotations: dict[str, str]
    payload: dict[str, Any]


class WebhookReceiver:
    """An Alertmanager webhook endpoint on a thread that records every alert it is sent."""

    def __init__(self) -> None:
        self.notifications: list[Notification] = []
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                payload = json.loads(self.rfile.read(length) or b"{}")
                now = time.time()
                with receiver._lock:
                    for alert in payload.get("alerts", []):
                        receiver.notifications.append(
                            Notification(
                                now,
                                str(alert.get("status")),
                                dict(alert.get("labels", {})),
                                dict(alert.get("annotations", {})),
                                payload,
                            )
                        )
                    receiver._lock.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The URL to put in an Alertmanager webhook_config."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def snapshot(self) -> list[Notification]:
        """Every notification so far."""
        with self._lock:
            return list(self.notifications)

    def wait_for(self, match: Callable[[Notification], bool], timeout: float) -> Notification:
        """The first notification that matches; TimeoutError naming what arrived instead."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for note in self.notifications:
                    if match(note):
                        return note
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(n.status, n.labels) for n in self.notifications]
                    raise TimeoutError(f"no matching notification within {timeout:.0f}s; got {seen}")
                self._lock.wait(left)

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def stack(targets: Sequence[str], rule_files: Sequence[Path]) -> Iterator[tuple[Running, Running, WebhookReceiver]]:
    """Webhook, Alertmanager (repo config, webhook URL swapped in) and Prometheus scraping `targets`."""
    with (
        WebhookReceiver() as hook,
        start_alertmanager(alertmanager_config(hook.url)) as am,
        start_prometheus(prometheus_config(targets, am.address), rule_files) as prom,
    ):
        yield prom, am, hook
