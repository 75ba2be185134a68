"""server: a real HTTP /metrics parsed by prometheus_client and checked by promtool; errors named."""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tele_exporter import PortInUseError, Telemetry, serve
from tele_exporter.server.http import Server

from ..conftest import TinyPolicy, backward


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
    assert samples[("tele_head_grad_norm_prev", (("head", "op"), ("kind", "action")))] == snap.head("op").prev
    assert samples[("tele_ppo_updates_total", ())] == 2.0


@pytest.mark.servers
def test_promtool_check_metrics_accepts_a_live_scrape(server: Server, tele: Telemetry, policy: TinyPolicy) -> None:
    _train(tele, policy, 2)
    tele.watch_seed(policy.trunk, host=policy, env=0, slot="r0c0")
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
        updates = 0
        while updates < 60 or (len(seen) <= 5 and updates < 6000):  # a busy machine may scrape slowly
            with tele.update() as upd:  # a different gradient each update, so a torn scrape shows
                backward(policy, scale=1.0 + updates % 7, seed=updates)
                upd.clip_grad_norm_(0.5)
            updates += 1
            currents[updates] = tele.snapshot().head("op").current
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 5
    for update, current, prev in seen:
        assert current == currents[update]
        assert prev == currents.get(update - 1, 0.0)  # TELE-321: prev is 0.0 until the second update


def test_snapshot_api_is_json_with_display_fields(server: Server, tele: Telemetry, policy: TinyPolicy) -> None:
    status, body = _get(server.base_url + "/api/snapshot")
    assert status == 200
    doc = json.loads(body)
    assert doc["version"] == 1 and doc["snapshot"]["updates"] == 0
    assert doc["snapshot"]["heads"][0]["current"] is None  # nothing measured yet: null (missing), not bare NaN
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
    tele.watch_seed(policy.trunk, host=policy, env=0, slot="r0c0")  # no backward gain: null, never 0.0
    _train(tele, policy, 1)
    (seed,) = json.loads(_get(server.base_url + "/api/snapshot")[1])["snapshot"]["seeds"]
    assert seed["backward_gain"] is None and seed["passes"] == 1 and seed["ratio"] > 0


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


def test_a_request_sent_a_few_bytes_at_a_time_is_answered_and_an_oversized_head_is_431(server: Server) -> None:
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        for i in range(0, len(request), 7):
            s.sendall(request[i : i + 7])
            time.sleep(0.01)
        reply = b"".join(iter(lambda: s.recv(65536), b""))
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"tele_ppo_updates_total" in reply
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"x" * 20000 + b"\r\n\r\n")
        reply = b"".join(iter(lambda: s.recv(65536), b""))
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert _get(server.url)[0] == 200


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


class _CountingCollector:
    """Counts how often the registry is rendered: a cache miss collects every collector."""

    def __init__(self) -> None:
        self.calls = 0

    def collect(self) -> Iterator[Any]:
        self.calls += 1
        return iter(())


@pytest.fixture
def renders(tele: Telemetry) -> _CountingCollector:
    counter = _CountingCollector()
    tele.registry.register(counter)  # type: ignore[arg-type]
    return counter


def _head(url: str, headers: dict[str, str] | None = None, method: str = "HEAD") -> tuple[int, dict[str, str], bytes]:
    """A raw request, so that a body sent after a HEAD reply is seen (urllib would drop it)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].partition("/")[2]
    lines = [f"{method} {path} HTTP/1.0", f"Host: {host}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), fields, body


@pytest.mark.parametrize("path", ["/", "/api/snapshot", "/metrics", "/metrics?name[]=tele_ppo_updates_total"])
def test_head_answers_like_get_without_a_body(server: Server, path: str) -> None:
    status, headers, body = _head(server.base_url + path)
    get_status, get_headers, get_body = _head(server.base_url + path, method="GET")
    assert (status, body) == (200, b"")
    assert get_status == 200 and int(headers["Content-Length"]) == len(get_body) > 0
    assert headers["Content-Type"] == get_headers["Content-Type"]


def test_options_lists_the_methods(server: Server) -> None:
    status, headers, body = _head(server.url, method="OPTIONS")
    assert (status, body) == (200, b"") and headers["Allow"] == "GET, HEAD, OPTIONS"


@pytest.mark.parametrize("version", ["abc", "1.x", "99.0.0", "1..0", "0.0.1"])
def test_an_invalid_openmetrics_version_falls_back_to_the_text_format(
    server: Server, version: str, capfd: pytest.CaptureFixture[str]
) -> None:
    accept = f"application/openmetrics-text; version={version}"
    status, headers, body = _head(server.url, {"Accept": accept}, method="GET")
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# TYPE tele_ppo_updates_total counter" in body
    assert "Traceback" not in capfd.readouterr().err


def test_the_metrics_cache_is_keyed_by_the_negotiated_format_not_the_clients_string(
    server: Server, renders: _CountingCollector
) -> None:
    types = set()
    for n in range(200):
        _, headers, body = _head(server.url, {"Accept": f"application/openmetrics-text; version=1.0.{n}"}, "GET")
        assert body.endswith(b"# EOF\n")
        types.add(headers["Content-Type"])
    assert types == {"application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"}
    assert renders.calls == 1  # one format, one snapshot: one render, whatever the client wrote


def test_query_strings_other_than_name_filters_are_served_from_the_cache(
    server: Server, renders: _CountingCollector
) -> None:
    for n in range(50):
        assert _get(f"{server.url}?x={n}")[0] == 200
    assert renders.calls == 1
    for n in range(50):
        assert _get(f"{server.url}?name[]=tele_ppo_updates_total&name[]=n{n}")[0] == 200
    assert renders.calls <= 1 + 50  # filters render, but their cache is bounded
    for _ in range(5):
        _get(f"{server.url}?name[]=tele_ppo_updates_total&name[]=n49")
    assert renders.calls <= 1 + 50


def test_the_snapshot_api_is_rendered_once_per_published_snapshot(
    server: Server, tele: Telemetry, policy: TinyPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tele_exporter.server import api

    calls = []
    real = api.snapshot_document
    monkeypatch.setattr(api, "snapshot_document", lambda t: calls.append(1) or real(t))
    for _ in range(10):
        assert _get(server.base_url + "/api/snapshot")[0] == 200
    assert len(calls) == 1
    _train(tele, policy, 1)
    for _ in range(10):
        assert json.loads(_get(server.base_url + "/api/snapshot")[1])["snapshot"]["updates"] == 1
    assert len(calls) == 2


def _threads_and_fds() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


def test_held_connections_beyond_the_cap_cost_the_trainer_nothing_and_a_scrape_still_answers(tele: Telemetry) -> None:
    threads0, fds0 = _threads_and_fds()
    cap = 8
    with serve(tele, port=0, max_connections=cap) as srv:
        assert srv.pid is not None and srv.pid != os.getpid()
        held: list[socket.socket] = []
        try:
            for _ in range(100):
                held.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
            for s in held[:50]:
                s.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")  # never finishes its request
            started = time.monotonic()
            status, body = _get(srv.url)
            assert status == 200 and b"tele_ppo_updates_total" in body
            assert time.monotonic() - started < 5.0
            # the trainer: one thread and one socket to the serving process, whatever the clients do
            assert _threads_and_fds() == (threads0 + 1, fds0 + len(held) + 1)
            # the serving process: stdio, the listener, the trainer's socket, epoll, and at most `cap` clients
            fds = len(os.listdir(f"/proc/{srv.pid}/fd"))
            assert fds <= 6 + cap
        finally:
            for s in held:
                s.close()
    assert _threads_and_fds() == (threads0, fds0)


def test_max_connections_must_be_positive(tele: Telemetry) -> None:
    with pytest.raises(ValueError, match="max_connections must be a whole number >= 1, got 0"):
        serve(tele, port=0, max_connections=0)


def test_numpy_numbers_are_taken_where_ints_and_floats_are_and_bools_are_not(tele: Telemetry) -> None:
    """A count or a wait computed with numpy (np.int64, np.float64) works as the Python number would."""
    with serve(tele, port=np.int64(0), max_connections=np.int64(8), linger=np.int64(1)) as srv:
        assert srv.running and srv.linger == 1.0
        status, _ = _get(srv.url)
        assert status == 200
        assert srv.close(linger=np.float64(0.5)) is True
    for bad in (True, np.bool_(True), 2.0, np.float64(2.0), "8"):
        with pytest.raises(ValueError, match="max_connections must be a whole number >= 1"):
            serve(tele, port=0, max_connections=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_connections must be a whole number >= 1"):
        serve(tele, port=0, max_connections=np.int64(0))


def test_close_with_linger_waits_until_the_final_update_is_scraped(tele: Telemetry, policy: TinyPolicy) -> None:
    srv = serve(tele, port=0, linger=30)
    _train(tele, policy, 2)
    _get(srv.url)
    _train(tele, policy, 1)  # the final update: not scraped yet
    scraped: list[bool] = []
    closer = threading.Thread(target=lambda: scraped.append(srv.close()))
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # still lingering for Prometheus
    status, body = _get(srv.url)
    closer.join(10)
    assert status == 200
    assert not closer.is_alive() and scraped == [True]
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["tele_ppo_updates"].samples[0].value == 3
    with pytest.raises(OSError):
        _get(srv.url)


def test_close_lingers_until_the_finished_flag_is_scraped_after_the_last_update(
    tele: Telemetry, policy: TinyPolicy
) -> None:
    """tele.finish() after a scraped last update is news: close() waits for a scrape that says tele_run_finished 1."""
    srv = serve(tele, port=0, linger=30)
    _train(tele, policy, 2)
    _get(srv.url)  # the last update is scraped
    tele.finish()
    scraped: list[bool] = []
    closer = threading.Thread(target=lambda: scraped.append(srv.close()))
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # the finished flag is not scraped yet
    status, body = _get(srv.url)
    closer.join(10)
    assert status == 200 and not closer.is_alive() and scraped == [True]
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["tele_run_finished"].samples[0].value == 1.0


def test_close_with_linger_gives_up_after_the_timeout(tele: Telemetry, policy: TinyPolicy) -> None:
    srv = serve(tele, port=0)
    _train(tele, policy, 1)
    start = time.monotonic()
    assert srv.close(linger=0.3) is False
    assert 0.3 <= time.monotonic() - start < 5


def test_a_linger_that_times_out_logs_one_line_naming_the_wait_and_the_publication(
    tele: Telemetry, policy: TinyPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    srv = serve(tele, port=0)
    _train(tele, policy, 2)
    url = srv.url
    with caplog.at_level(logging.DEBUG, logger="tele_exporter"):
        assert srv.close(linger=0.3) is False
    lines = [r for r in caplog.records if r.name.startswith("tele_exporter")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert lines[0].name == "tele_exporter.server.http"
    message = lines[0].getMessage()
    assert "waited 0.3 s" in message and "publication 2" in message and url in message, message


def test_a_linger_that_is_met_logs_nothing(
    tele: Telemetry, policy: TinyPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    srv = serve(tele, port=0, linger=30)
    _train(tele, policy, 1)
    _get(srv.url)
    with caplog.at_level(logging.DEBUG, logger="tele_exporter"):
        assert srv.close() is True
    assert not [r for r in caplog.records if r.name.startswith("tele_exporter")]


def test_close_does_not_linger_without_updates_or_when_already_scraped(tele: Telemetry, policy: TinyPolicy) -> None:
    srv = serve(tele, port=0, linger=60)
    assert srv.close() is True
    srv = serve(tele, port=0, linger=60)
    _train(tele, policy, 1)
    _get(srv.url)
    start = time.monotonic()
    assert srv.close() is True
    assert time.monotonic() - start < 5


def test_a_head_request_or_the_page_is_not_a_scrape(tele: Telemetry, policy: TinyPolicy) -> None:
    srv = serve(tele, port=0)
    _train(tele, policy, 1)
    _get(srv.url, method="HEAD")
    _get(srv.base_url + "/api/snapshot")
    assert srv.close(linger=0.2) is False


def test_linger_must_be_a_finite_non_negative_number(tele: Telemetry) -> None:
    for bad in (-1, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="linger must be"):
            serve(tele, port=0, linger=bad)


def test_a_disabled_telemetry_is_not_served(policy: TinyPolicy) -> None:
    off = Telemetry(policy, heads={"op": policy.op}, enabled=False)
    srv = serve(off, port=0, linger=60)
    assert not srv.running and srv.port == 0
    start = time.monotonic()
    assert srv.close() is True
    assert time.monotonic() - start < 1
