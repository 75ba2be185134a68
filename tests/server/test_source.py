"""source: the server layer needs only a SnapshotSource, never a Telemetry, and loads neither torch nor telemetry/."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any
from wsgiref.util import setup_testing_defaults

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tele_exporter.catalog import Catalog, default_catalog
from tele_exporter.server import serve
from tele_exporter.server.collector import TeleCollector
from tele_exporter.server.routes import make_app
from tele_exporter.server.source import SnapshotSource
from tele_exporter.snapshot import Snapshot, empty_snapshot

IMPORT_CHECK = """
import sys
import tele_exporter.server
import tele_exporter.server.api, tele_exporter.server.build_info, tele_exporter.server.collector
import tele_exporter.server.connections, tele_exporter.server.routes, tele_exporter.server.source
import tele_exporter.server.child, tele_exporter.server.handover, tele_exporter.server.process
tele_exporter.server.build_info.build_info()
print(sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "tele_exporter.telemetry"))))
"""


def test_importing_the_server_loads_neither_torch_nor_the_telemetry_layer() -> None:
    """Every server module, and build_info's torch version, in a fresh interpreter (this one has torch loaded)."""
    result = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@dataclasses.dataclass(frozen=True)
class HandMade:
    """A SnapshotSource that is not a Telemetry: fixed fields and one fixed snapshot."""

    catalog: Catalog
    const_labels: Mapping[str, str]
    registry: CollectorRegistry
    published: Snapshot
    owns_registry: bool = True
    enabled: bool = True

    def snapshot(self) -> Snapshot:
        return self.published

    def errors(self) -> dict[str, int]:
        return {"hook": 2}


def _source(enabled: bool = True) -> SnapshotSource:
    snapshot = dataclasses.replace(
        empty_snapshot((("op", "action"),)), updates=3, grad_norm_pre=2.0, grad_norm_post=0.5, kl=0.01
    )
    return HandMade(default_catalog(), {"run": "r1"}, CollectorRegistry(), snapshot, enabled=enabled)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_the_collector_needs_only_a_snapshot_source_and_the_launch_facts() -> None:
    source = _source()
    source.registry.register(TeleCollector(source, world_size=4, restarts=2))
    samples = _samples(generate_latest(source.registry).decode())
    run = (("run", "r1"),)
    assert samples[("tele_ppo_updates_total", run)] == 3.0
    assert samples[("tele_policy_grad_norm", (("clip", "pre"), ("run", "r1")))] == 2.0
    assert samples[("tele_kl_divergence", run)] == 0.01
    assert samples[("tele_world_size", run)] == 4.0
    assert samples[("tele_torchrun_restarts", run)] == 2.0
    assert samples[("tele_telemetry_errors_total", (("run", "r1"), ("site", "hook")))] == 2.0


def test_without_torchrun_there_is_no_restarts_sample() -> None:
    source = _source()
    source.registry.register(TeleCollector(source, world_size=1, restarts=None))
    samples = _samples(generate_latest(source.registry).decode())
    assert samples[("tele_world_size", (("run", "r1"),))] == 1.0
    assert not any(name == "tele_torchrun_restarts" for name, _ in samples)


def _call(app: Any, path: str) -> tuple[str, bytes]:
    environ: dict[str, Any] = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        statuses.append(status)

    body: Iterable[bytes] = app(environ, start_response)
    return statuses[0], b"".join(body)


def test_the_app_serves_metrics_and_the_snapshot_api_from_a_snapshot_source() -> None:
    source = _source()
    source.registry.register(TeleCollector(source, world_size=1, restarts=None))
    app = make_app(source)
    status, body = _call(app, "/metrics")
    assert status == "200 OK"
    assert _samples(body.decode())[("tele_ppo_updates_total", (("run", "r1"),))] == 3.0
    status, body = _call(app, "/api/snapshot")
    assert status == "200 OK"
    document = json.loads(body)
    assert document["snapshot"]["updates"] == 3 and "kl_divergence" in document["metrics"]
    assert _call(app, "/")[0] == "200 OK" and _call(app, "/nope")[0] == "404 Not Found"


def test_serve_runs_on_a_snapshot_source_and_close_waits_for_its_latest_update() -> None:
    source = _source()
    source.registry.register(TeleCollector(source, world_size=1, restarts=None))
    server = serve(source, port=0)
    try:
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            assert _samples(resp.read().decode())[("tele_ppo_updates_total", (("run", "r1"),))] == 3.0
    finally:
        assert server.close(linger=5.0)  # the scrape above carried update 3
    assert not server.running


def test_a_disabled_snapshot_source_is_not_served() -> None:
    server = serve(_source(enabled=False), port=0)
    assert not server.running and server.port == 0
    assert server.close()
