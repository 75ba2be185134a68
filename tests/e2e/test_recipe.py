"""The alert recipe of docs/alerting.md and the README, run as documented, fires its alert and resolves it.

The commands are read from the docs: `tele-exporter stack`, then `tele-exporter demo
--fault kl` until TeleKLDivergenceHigh fires, then Ctrl-C and a healthy `tele-exporter
demo --updates 0` until it resolves. The only change is where things listen: free
ports instead of 9090/9093/9842, in a copy of prometheus/ whose prometheus.yml
differs only in those addresses, so the test can run beside other servers.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.demo import Demo
from tests.support.processes import stop_process
from tests.support.servers import free_port, http_get, poll

pytestmark = [pytest.mark.slow, pytest.mark.servers]

ROOT = Path(__file__).resolve().parents[2]
ALERT = "TeleKLDivergenceHigh"
FIRE_TIMEOUT_S = 300.0
RESOLVE_TIMEOUT_S = 90.0


def recipe() -> list[list[str]]:
    """The `tele-exporter` commands of docs/alerting.md's local-stack section, in order."""
    text = (ROOT / "docs" / "alerting.md").read_text(encoding="utf-8")
    section = text.split("## Running a local stack", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    lines = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("tele-exporter ")]


def run(argv: list[str], *extra: str) -> subprocess.Popen[str]:
    """A documented `tele-exporter ...` command through this interpreter, with `extra` flags."""
    assert argv[0] == "tele-exporter"
    command = [sys.executable, "-m", "tele_exporter.cli", *argv[1:], *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)


def demo(argv: list[str], address: str) -> Demo:
    """A documented demo command, listening on `address`; waits for its URL line."""
    started = Demo(run(argv, "--web.listen-address", address))
    threading.Thread(target=started._read, daemon=True).start()
    started._wait(lambda: bool(started.url), 120, "metrics URL")
    return started


def active(url: str, api: str) -> list[dict[str, Any]]:
    """The Tele alerts Prometheus (/api/v1/alerts) or Alertmanager (/api/v2/alerts) holds."""
    body = json.loads(http_get(f"{url}{api}"))
    alerts = body["data"]["alerts"] if isinstance(body, dict) else body
    return [a for a in alerts if a["labels"]["alertname"].startswith("Tele")]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """`tele-exporter stack` on free ports; yields (Prometheus URL, Alertmanager URL, trainer address)."""
    prom, am, trainer = (f"127.0.0.1:{free_port()}" for _ in range(3))
    config = tmp_path / "prometheus"
    shutil.copytree(ROOT / "prometheus", config)
    shipped = (config / "prometheus.yml").read_text(encoding="utf-8")
    assert "127.0.0.1:9842" in shipped and "127.0.0.1:9093" in shipped
    (config / "prometheus.yml").write_text(
        shipped.replace("127.0.0.1:9842", trainer).replace("127.0.0.1:9093", am), encoding="utf-8"
    )
    command = recipe()[0]
    assert command == ["tele-exporter", "stack"]
    process = run(command, "--config-dir", str(config), "--prometheus-address", prom, "--alertmanager-address", am)
    try:
        for address in (prom, am):
            poll(lambda a=address: http_get(f"http://{a}/-/ready"), 60, what=f"stack at {address}")
        yield f"http://{prom}", f"http://{am}", trainer
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=30)
        finally:
            stop_process(process)


def test_the_documented_commands_are_stack_fault_and_healthy() -> None:
    assert recipe() == [
        ["tele-exporter", "stack"],
        ["tele-exporter", "demo", "--fault", "kl"],
        ["tele-exporter", "demo", "--updates", "0"],
    ]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in recipe():
        assert f"`{shlex.join(command)}`" in readme, command


def test_the_recipe_fires_its_alert_then_resolves_it(stack: tuple[str, str, str]) -> None:
    prom, am, trainer = stack
    _, faulty, healthy = recipe()
    states: set[tuple[str, str, str]] = set()

    def prometheus_fires() -> bool:
        alerts = active(prom, "/api/v1/alerts")
        states.update((a["labels"]["alertname"], a["labels"]["severity"], a["state"]) for a in alerts)
        return (ALERT, "critical", "firing") in states and any(a["labels"]["alertname"] == ALERT for a in alerts)

    def alertmanager_has() -> bool:
        return any(a["labels"]["alertname"] == ALERT for a in active(am, "/api/v2/alerts"))

    with demo(faulty, trainer) as bad:
        poll(prometheus_fires, FIRE_TIMEOUT_S, interval=1.0, what=f"{ALERT} firing")
        poll(alertmanager_has, 60, interval=1.0, what=f"{ALERT} in Alertmanager")
        assert bad.process.poll() is None, "a fault run keeps training until Ctrl-C"
        bad.process.send_signal(signal.SIGINT)
        assert bad.process.wait(timeout=60) == 0
    with demo(healthy, trainer):
        poll(lambda: not prometheus_fires(), RESOLVE_TIMEOUT_S, interval=1.0, what=f"{ALERT} resolved")
        poll(lambda: not alertmanager_has(), RESOLVE_TIMEOUT_S, interval=1.0, what="resolved in Alertmanager")
    fired = {(name, severity) for name, severity, state in states if state == "firing"}
    assert fired == {(ALERT, "critical")}, states
