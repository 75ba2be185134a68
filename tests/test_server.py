"""server: a real HTTP /metrics parsed by prometheus_client and checked by promtool; errors named."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tele_exporter import PortInUseError, Telemetry, serve
from tele_exporter.server import Server

from .conftest import TinyPolicy, backward


@pytest.fixture
def server(tele: Telemetry) -> Iterator[Server]:
    srv = serve(tele, port=0)
    yield srv
    srv.close()


def _get(url: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _train(tele: Telemetry, policy: TinyPolicy, updates: int) -> None:
    for u in range(updates):
        with tele.update() as upd:
            backward(policy, scale=1.0 + u, seed=u)
            upd.clip_grad_norm_(0.5)


def test_scrape_parses_and_matches_the_snapshot(server: Server, tele: Telemetry, policy: TinyPolicy) -> None:
    _train(tele, policy, 2)
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/metrics")
    status, body = _get(server.url)
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }
    snap = tele.snapshot()
    assert samples[("tele_head_grad_norm_prev", (("head", "op"),))] == snap.head("op").prev
    assert samples[("tele_ppo_updates_total", ())] == 2.0


@pytest.mark.servers
def test_promtool_check_metrics_accepts_a_live_scrape(server: Server, tele: Telemetry, policy: TinyPolicy) -> None:
    _train(tele, policy, 2)
    tele.watch_seed(policy.trunk, env=0, slot="r0c0")
    _train(tele, policy, 1)
    _, body = _get(server.url)
    assert shutil.which("promtool"), "promtool is missing: install Debian's prometheus package"
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_unknown_path_is_404_and_wrong_method_is_405(server: Server) -> None:
    assert _get(server.base_url + "/nope")[0] == 404
    status, _ = _get(server.url, method="POST")
    assert status == 405
    status, body = _get(server.base_url + "/")
    assert status == 200 and b"/metrics" in body


def test_taken_port_is_a_clear_error_naming_the_address(server: Server, tele: Telemetry) -> None:
    with pytest.raises(PortInUseError, match=f"127.0.0.1:{server.port}: address already in use"):
        serve(tele, port=server.port)


def test_close_releases_the_port(tele: Telemetry) -> None:
    srv = serve(tele, port=0)
    port = srv.port
    srv.close()
    srv.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_scrapes_during_training_never_see_a_torn_update(server: Server, tele: Telemetry, policy: TinyPolicy) -> None:
    """A scrape shows one update: prev of that update equals current of the update before."""
    currents: dict[int, float] = {}
    seen: list[tuple[int, float, float]] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            _, body = _get(server.url)
            values = {
                (s.name, s.labels.get("head")): s.value
                for f in text_string_to_metric_families(body.decode())
                for s in f.samples
            }
            if ("tele_head_grad_norm", "op") in values:
                seen.append(
                    (
                        int(values[("tele_ppo_updates_total", None)]),
                        values[("tele_head_grad_norm", "op")],
                        values[("tele_head_grad_norm_prev", "op")],
                    )
                )

    thread = threading.Thread(target=scrape)
    thread.start()
    try:
        for u in range(60):
            _train(tele, policy, 1)
            currents[u + 1] = tele.snapshot().head("op").current
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 5
    for update, current, prev in seen:
        assert current == currents[update]
        assert prev == currents.get(update - 1, 0.0)


def test_snapshot_api_is_json_with_display_fields(server: Server, tele: Telemetry, policy: TinyPolicy) -> None:
    status, body = _get(server.base_url + "/api/snapshot")
    assert status == 200
    doc = json.loads(body)
    assert doc["version"] == 1 and doc["snapshot"]["updates"] == 0
    assert doc["snapshot"]["heads"][0]["current"] == "NaN"  # nothing measured yet: strings, not bare NaN
    _train(tele, policy, 2)
    doc = json.loads(_get(server.base_url + "/api/snapshot")[1])
    snap = doc["snapshot"]
    assert snap["updates"] == 2
    assert snap["heads"][0]["prev"] == tele.snapshot().head("op").prev
    assert snap["heads"][0]["trend"]["arrow"] in {"→", "↗", "↘"}
    assert snap["grad_norm"]["shown"]["status"] in {"ok", "warning", "critical"}
    assert len(snap["grad_norm"]["history"]) == 2
    assert doc["colours"]["critical"] == "red"
    assert doc["metrics"]["kl_divergence"]["question"].startswith("What is the KL divergence trend")


def test_half_open_slow_and_malformed_clients_do_not_stall_scrapes(server: Server, tele: Telemetry) -> None:
    """A bounded burst on 127.0.0.1: idle sockets, a slowloris header, garbage; a scrape still answers."""
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(64)]
    slow = []
    for _ in range(16):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finishes its headers
        slow.append(s)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as bad:
            bad.sendall(b"\x00\x01GARBAGE\r\n\r\n")
            reply = b"".join(iter(lambda: bad.recv(4096), b""))
            assert b"400" in reply  # http.server answers a request line it cannot parse with 400
        for _ in range(20):
            status, body = _get(server.url)
            assert status == 200 and b"tele_ppo_updates_total" in body
    finally:
        for s in idle + slow:
            s.close()


def _fetch(url: str, headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return dict(resp.headers.items()), resp.read()


def test_cached_render_equals_prometheus_client_and_follows_each_publish(
    server: Server, tele: Telemetry, policy: TinyPolicy
) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

    _train(tele, policy, 1)
    _, first = _fetch(server.url, {})
    assert first == generate_latest(tele.registry)
    headers, om = _fetch(server.url, {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text") and om.endswith(b"# EOF\n")
    assert om == generate_openmetrics(tele.registry)
    headers, packed = _fetch(server.url, {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip" and gzip.decompress(packed) == first
    _train(tele, policy, 1)
    assert _fetch(server.url, {})[1] == generate_latest(tele.registry) != first  # a publish invalidates
    tele.record_error("seed_hook", RuntimeError("x"))
    assert b'tele_telemetry_errors_total{site="seed_hook"} 1.0' in _fetch(server.url, {})[1]
    _, only = _fetch(server.url + "?name[]=tele_ppo_updates_total", {})
    assert only.decode().count("# TYPE") == 1  # filters go to prometheus_client's own app


def test_a_shared_registry_is_never_served_from_the_cache(policy: TinyPolicy) -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    other = Counter("other_events", "another library's counter", registry=registry)
    tele = Telemetry(policy, heads={"op": policy.op}, registry=registry)
    srv = serve(tele, port=0)
    try:
        _fetch(srv.url, {})
        other.inc()
        assert b"other_events_total 1.0" in _fetch(srv.url, {})[1]
    finally:
        srv.close()
        tele.close()
