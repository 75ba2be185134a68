"""Hostile clients, counted not timed: held connections do not queue a scrape, floods cost the trainer no answers.

Every client here is bounded in count and in time, talks to 127.0.0.1 over real sockets,
and the floods run in a separate process so that only the exporter's own work lands in this one.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from tele_exporter import Telemetry, serve
from tele_exporter.server.http import Server

USER, PASSWORD = "prometheus", "correct horse"
PARTIAL = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "  # one header left open: a slowloris


def _auth(password: str) -> str:
    return "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()


def _get(url: str, password: str | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": _auth(password)} if password else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _serving_pids(srv: Server) -> list[int]:
    """The processes whose threads and descriptors serve: a serving child if there is one, else this process."""
    pid = getattr(srv, "pid", None)
    return [pid] if pid else [os.getpid()]


def _threads_and_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def _resting(pids: list[int], seconds: float = 5.0) -> list[tuple[int, int]]:
    """Threads and descriptors of `pids` once unchanged for 0.3 s (at most `seconds`): no answer still closing."""
    deadline = time.monotonic() + seconds
    last, since = [_threads_and_fds(pid) for pid in pids], time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < 0.3:
        time.sleep(0.05)
        now = [_threads_and_fds(pid) for pid in pids]
        if now != last:
            last, since = now, time.monotonic()
    return last


def _hold(port: int, count: int, send: bytes, seconds: float) -> list[socket.socket]:
    """`count` connections, each sending `send` once connected; non-blocking, so a server that stops accepting
    cannot stall the test: connections still pending after `seconds` are kept as they are."""
    pending: dict[int, socket.socket] = {}
    held: list[socket.socket] = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex(("127.0.0.1", port))
        assert err in (0, errno.EINPROGRESS), os.strerror(err)
        pending[s.fileno()] = s
        held.append(s)
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + seconds
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            s = pending.pop(fd)
            poller.unregister(fd)
            if send and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                with contextlib.suppress(OSError):
                    s.send(send)
    return held


def _let_go(held: list[socket.socket]) -> int:
    """How many held connections the server has closed or answered: readable, or reset."""
    poller = select.poll()
    for s in held:
        poller.register(s.fileno(), select.POLLIN | select.POLLRDHUP)
    gone = select.POLLIN | select.POLLRDHUP | select.POLLERR | select.POLLHUP
    return sum(1 for _, events in poller.poll(0) if events & gone)


def _accept_queue(port: int) -> int:
    """Connections the kernel has completed on 127.0.0.1:`port` that the server has not accepted yet."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # the listening socket
            return int(fields[4].split(":")[1], 16)
    return 0


def _settled(held: list[socket.socket], port: int, seconds: float = 10.0) -> int:
    """The let-go count once the server has accepted what the kernel queued for it (at most `seconds`), and the
    count has stayed put for 0.3 s. A connection still queued is ahead of a new one whatever the server does;
    a server that stops accepting keeps the queue full, and the wait ends at `seconds`."""
    deadline = time.monotonic() + seconds
    while _accept_queue(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    last, since = _let_go(held), time.monotonic()
    while time.monotonic() - since < 0.3 and time.monotonic() < deadline + 2:
        time.sleep(0.05)
        now = _let_go(held)
        if now != last:
            last, since = now, time.monotonic()
    return last


def _close(held: list[socket.socket]) -> None:
    for s in held:
        s.close()


def test_a_scrape_is_not_queued_behind_300_held_connections(tele: Telemetry) -> None:
    """300 clients each send a partial request and hold it; a scrape is answered without waiting for any of them.

    Counted, not timed: between sending the scrape and getting its answer, how many held connections did the
    server have to let go of (answer, cut off or close) first? A server that gives each connection a handler
    slot until it finishes makes the scrape wait for the connections accepted ahead of it; one that holds
    them without a slot closes at most one, to make room for the scrape.
    """
    with serve(tele, port=0) as srv:
        held = _hold(srv.port, 300, PARTIAL, seconds=5.0)
        try:
            before = _settled(held, srv.port)
            status, body = _get(srv.url, timeout=60)
            ahead = _let_go(held) - before
        finally:
            _close(held)
    assert status == 200 and b"tele_ppo_updates_total" in body
    assert ahead <= 1, f"the scrape was answered only after {ahead} held connections were let go"


@pytest.mark.slow
def test_2000_held_connections_keep_the_server_bounded_and_nothing_leaks(tele: Telemetry) -> None:
    """2,000 slowloris clients: the scrape is still answered ahead of them, the serving process stays under
    150 threads and 150 descriptors, and once the clients go its descriptors and this process's are as before."""
    trainer0 = _threads_and_fds(os.getpid())
    with serve(tele, port=0) as srv:
        assert _get(srv.url)[0] == 200
        pids = _serving_pids(srv)
        idle = _resting(pids)
        held = _hold(srv.port, 2000, PARTIAL, seconds=15.0)
        try:
            before = _settled(held, srv.port)
            loaded = [_threads_and_fds(pid) for pid in pids]
            status, _ = _get(srv.url, timeout=60)
            ahead = _let_go(held) - before
            loaded += [_threads_and_fds(pid) for pid in pids]
        finally:
            _close(held)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and [_threads_and_fds(pid) for pid in pids] != idle:
            time.sleep(0.1)
        after = _resting(pids)
        if pids != [os.getpid()]:
            served = _threads_and_fds(os.getpid())
            assert served[0] == trainer0[0] + 1  # one thread feeds the serving process
    assert status == 200
    assert ahead <= 1, f"the scrape was answered only after {ahead} held connections were let go"
    for threads, fds in loaded:
        assert threads < 150 and fds < 150, loaded
    assert after == idle, f"after the clients left: {after}, before they came: {idle}"
    assert _threads_and_fds(os.getpid()) == trainer0


# A flood: `clients` threads in one process, `count` requests (or connections) in all, every one bounded in time.
_FLOOD = r"""
import base64, collections, json, random, socket, sys, threading, time
kind, port, count, clients, auth_right, auth_wrong = sys.argv[1:7]
port, count, clients = int(port), int(count), int(clients)
counts = collections.Counter()
lock = threading.Lock()

def request(path, auth):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        return reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/") else "none"
    except OSError:
        return "error"
    finally:
        s.close()

def requests(n):
    for _ in range(n):
        if kind == "wrong password":
            code = request("/metrics", auth_wrong)
        elif kind == "new guesses":
            guess = base64.b64encode(f"prometheus:guess-{random.random()}".encode()).decode()
            code = request("/metrics", "Basic " + guess)
        elif kind == "metrics":
            code = request("/metrics", auth_right)
        elif kind == "snapshot":
            code = request("/api/snapshot", auth_right)
        else:  # filters: a new name[] each time
            code = request(f"/metrics?name[]=tele_ppo_updates_total&name[]=n{random.random()}", auth_right)
        with lock:
            counts[code] += 1

def connections(n):
    held = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if kind == "slow":
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            held.append(s)
            with lock:
                counts["opened"] += 1
        except OSError:
            with lock:
                counts["error"] += 1
        if len(held) > 25:
            held.pop(0).close()
    for s in held:
        s.close()

print("ready", flush=True)
sys.stdin.readline()
work = connections if kind in ("silent", "slow") else requests
threads = [threading.Thread(target=work, args=(count // clients,)) for _ in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(dict(counts)), flush=True)
"""

# kind: (requests or connections in all, what each must get)
FLOODS = {
    "wrong password": (400, "401"),
    "new guesses": (64, "401"),
    "metrics": (400, "200"),
    "snapshot": (400, "200"),
    "filters": (400, "200"),
    "silent": (400, "opened"),
    "slow": (400, "opened"),
}


class _TrainerSockets:
    """Counts what this process's own threads do on TCP sockets: connections accepted, answers written."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.accepted = 0
        self.writes = 0
        self._lock = threading.Lock()
        real_accept, real_send, real_sendall = socket.socket.accept, socket.socket.send, socket.socket.sendall
        counter = self

        def accept(sock: socket.socket) -> tuple[socket.socket, object]:
            pair = real_accept(sock)
            with counter._lock:
                counter.accepted += 1
            return pair

        def send(sock: socket.socket, data: bytes, *args: int) -> int:
            counter._wrote(sock)
            return int(real_send(sock, data, *args))

        def sendall(sock: socket.socket, data: bytes, *args: int) -> None:
            counter._wrote(sock)
            real_sendall(sock, data, *args)

        monkeypatch.setattr(socket.socket, "accept", accept)
        monkeypatch.setattr(socket.socket, "send", send)
        monkeypatch.setattr(socket.socket, "sendall", sendall)

    def _wrote(self, sock: socket.socket) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            with self._lock:
                self.writes += 1


@pytest.fixture
def guarded(tele: Telemetry, tmp_path: Path) -> Iterator[Server]:
    """The default serve() with basic auth (a cost-4 bcrypt hash, so the test is quick)."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  {USER}: {hashed}\n")
    with serve(tele, port=0, web_config=config) as srv:
        yield srv


@pytest.mark.parametrize("kind", FLOODS)
def test_a_flood_costs_the_trainer_no_answers_and_bounded_cpu(
    kind: str, guarded: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each flood kind, from 8 clients in another process: the work it makes in the trainer's interpreter.

    Counted: connections accepted and answers written by this process's threads, and the CPU seconds this
    process spent while the flood ran (its main thread only waits), at most 50 µs a request and 10 ms besides.
    """
    count, expected = FLOODS[kind]
    assert _get(guarded.url, PASSWORD)[0] == 200  # the first scrape: rendered, the password checked and cached
    argv = [sys.executable, "-c", _FLOOD, kind, str(guarded.port), str(count), "8", _auth(PASSWORD), _auth("wrong")]
    client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "ready"
        trainer = _TrainerSockets(monkeypatch)
        cpu = time.process_time()
        out, _ = client.communicate("go\n", timeout=120)
        cpu = time.process_time() - cpu
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    monkeypatch.undo()
    counts = json.loads(out)
    assert counts.get(expected) == count, counts  # the flood did happen, and was answered as it should be
    work = f"accepted {trainer.accepted} connections, wrote {trainer.writes} answers, spent {1e3 * cpu:.1f} ms of CPU"
    print(f"{kind}: {work}")
    assert (trainer.accepted, trainer.writes) == (0, 0), f"on {count} {kind} requests the trainer's threads {work}"
    assert cpu <= 0.010 + 50e-6 * count, f"on {count} {kind} requests the trainer's threads {work}"
    assert _get(guarded.url, PASSWORD)[0] == 200
