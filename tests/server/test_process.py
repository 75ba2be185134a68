"""The serving process: what it loads, how it ends with the trainer, and what it does when the trainer cannot answer."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tele_exporter.catalog import default_catalog
from tele_exporter.server import child, serve
from tele_exporter.server.collector import TeleCollector
from tele_exporter.snapshot import Snapshot, empty_snapshot

from .test_source import HandMade

ROOT = Path(__file__).resolve().parents[2]


def _get(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _source(snapshot: Snapshot | None = None, registry: CollectorRegistry | None = None) -> HandMade:
    snapshot = snapshot or dataclasses.replace(empty_snapshot((("op", "action"),)), updates=3)
    source = HandMade(default_catalog(), {}, registry or CollectorRegistry(), snapshot)
    source.registry.register(TeleCollector(source, world_size=1, restarts=None))
    return source


def _gone(pid: int, seconds: float) -> bool:
    """True once `pid` has exited (or is a zombie), polling for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_the_serving_process_loads_neither_torch_nor_the_trainers_memory() -> None:
    server = serve(_source(), port=0)
    try:
        assert _get(server.url)[0] == 200
        assert server.pid is not None
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        assert "libtorch" not in maps and "libc10" not in maps
        rss_kib = int(next(line.split()[1] for line in Path(f"/proc/{server.pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:")))  # fmt: skip
        assert rss_kib < 200_000
    finally:
        server.close()
    assert not server.running and server.pid is None


TRAINER = """
import dataclasses, sys
sys.path[:0] = {paths!r}
from prometheus_client import CollectorRegistry
from tele_exporter.catalog import default_catalog
from tele_exporter.server import serve
from tele_exporter.snapshot import empty_snapshot
from tests.server.test_source import HandMade
source = HandMade(default_catalog(), {{}}, CollectorRegistry(), empty_snapshot(()))
server = serve(source, port=0)
print(server.port, server.pid, flush=True)
sys.stdin.readline()
"""


def test_the_serving_process_ends_when_the_trainer_is_killed() -> None:
    """SIGKILL leaves the trainer no close(): the serving process sees its channel end, and the port is free."""
    code = TRAINER.format(paths=[str(ROOT), str(ROOT / "exporter")])
    trainer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout is not None
        port, pid = map(int, trainer.stdout.readline().split())
        assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        assert _gone(pid, 10), "the serving process outlived its trainer"
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()


def test_a_serving_process_that_cannot_start_is_an_error_and_leaves_nothing_bound(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'no interpreter here' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(broken))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    threads = threading.active_count()
    with pytest.raises(OSError, match="the serving process exited at start"):
        serve(_source(), port=port)
    assert threading.active_count() == threads
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_a_collector_that_raises_is_a_500_and_serving_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def collect(self) -> list[object]:
            raise RuntimeError("boom")

    registry = CollectorRegistry()
    source = _source(registry=registry)
    broken = Broken()
    registry.register(broken)  # type: ignore[arg-type]
    with serve(source, port=0) as server:
        assert _get(server.url)[0] == 500
        assert "collecting the registry for /metrics failed" in caplog.text
        assert _get(server.base_url + "/api/snapshot")[0] == 200
        registry.unregister(broken)  # type: ignore[arg-type]
        status, body = _get(server.url)  # a failed collect is tried again at the next ask
    assert status == 200 and b"tele_ppo_updates_total 3.0" in body


@dataclasses.dataclass(frozen=True)
class _Gated(HandMade):
    """A source whose snapshot() waits while the test holds `gate`: a trainer stuck in a long call holding the GIL."""

    gate: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def snapshot(self) -> Snapshot:
        with self.gate:
            return self.published


def _gated() -> _Gated:
    source = _Gated(default_catalog(), {}, CollectorRegistry(), dataclasses.replace(empty_snapshot(()), updates=7))
    source.registry.register(TeleCollector(source, world_size=1, restarts=None))
    return source


def test_a_trainer_that_does_not_answer_gets_its_last_state_served_not_a_hung_scrape() -> None:
    source = _gated()
    with serve(source, port=0) as server:
        assert b"tele_ppo_updates_total 7.0" in _get(server.url)[1]
        with source.gate:
            started = time.monotonic()
            status, body = _get(server.url)
            waited = time.monotonic() - started
    assert status == 200 and b"tele_ppo_updates_total 7.0" in body
    assert child.ASK_TIMEOUT <= waited < child.ASK_TIMEOUT + 10


def test_requests_waiting_for_the_trainer_share_its_answers() -> None:
    """Counted: 40 scrapes that arrive while the trainer is busy cost it at most 2 answers more, not 40."""
    source = _gated()
    with serve(source, port=0) as server:
        assert _get(server.url)[0] == 200 and server._child is not None and server.pid is not None
        fds = len(os.listdir(f"/proc/{server.pid}/fd"))
        before = server._child.asks
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(_get(server.url)[0])) for _ in range(40)]
        with source.gate:
            for t in threads:
                t.start()
            deadline = time.monotonic() + child.ASK_TIMEOUT / 2
            while len(os.listdir(f"/proc/{server.pid}/fd")) < fds + 40 and time.monotonic() < deadline:
                time.sleep(0.01)
        for t in threads:
            t.join(60)
        asks = server._child.asks - before
    assert results == [200] * 40
    assert asks <= 2, asks
