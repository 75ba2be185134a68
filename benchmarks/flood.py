"""Training throughput while clients scrape politely or flood the exporter, against no clients, with the load beside it.

A training loop (the `tele-exporter bench` 8-head policy, one published update every
--steps steps, one torch thread) runs in interleaved phases of --seconds each, in one run,
against the default serve() with basic auth (a bcrypt cost-10 hash):

    quiet     no client at all
    scrape    Prometheus-like: GET /metrics with the right password at --rate per second
    wrong     --workers clients, each a new connection per request, one wrong password (401 from the cache)
    metrics   --workers clients GETting /metrics with the right password, as fast as they go
    snapshot  --workers clients GETting /api/snapshot with the right password, as fast as they go
    held      connections that never send a byte, opened as fast as the exporter takes them, 200 kept

The clients run in a separate process at nice --client-nice (an attacker on its own machine
does not take this one's CPU); flood phases also scrape politely twice a second and report
the slowest. Then, for each count in --slow, that many connections each send a partial
request and hold it, and five scrapes are timed.

Printed: median steps/s per phase; each ratio to quiet with its target and, beside it, the
1-minute load average and the threads of other programs running meanwhile (the machine's own
load, this benchmark's processes left out). A ratio taken while the load average before the
run, or the other programs' load, exceeded 1.5 is marked NOISY: not a measurement of the
exporter; so is a held-connection timing when the machine was not quiet before the run
(the load average while it is taken is mostly this benchmark's own trainer). Also printed:
requests answered by status, and the peak threads, descriptors and RSS of the trainer and
of the serving process.

    python benchmarks/flood.py [--rounds 5] [--seconds 3] [--rate 100] [--workers 8] [--slow 300,2000]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import bcrypt
import torch

from tele_exporter.bench import BenchPolicy
from tele_exporter.server import connections
from tele_exporter.server.http import DEFAULT_MAX_CONNECTIONS, Server, serve
from tele_exporter.telemetry.telemetry import Telemetry

USER, PASSWORD = "prometheus", "correct horse battery staple"
PHASES = ("quiet", "scrape", "wrong", "metrics", "snapshot", "held")
TARGETS = {"scrape": 0.95, "wrong": 0.80, "metrics": 0.80, "snapshot": 0.80, "held": 0.90}
NOISY_LOAD = 1.5
SLOW_TARGETS = {300: 1.0, 2000: 5.0}  # seconds for a scrape while that many slow connections are held

_CLIENT = r"""
import base64, collections, json, os, select, socket, sys, threading, time
mode, port, rate, seconds, workers, user, password, nice = sys.argv[1:9]
port, rate, seconds, workers = int(port), float(rate), float(seconds), int(workers)
os.nice(int(nice))
counts = collections.Counter()
lock = threading.Lock()
right = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
wrong = "Basic " + base64.b64encode(f"{user}:not the password".encode()).decode()

def get(path, auth, key=None):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=15)
        try:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n\r\n".encode())
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            code = reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/") else "none"
        finally:
            s.close()
    except OSError:
        code = "error"
    with lock:
        counts[f"{key or path} {code}"] += 1

def slow(n):
    # n connections, each with a partial request; non-blocking, bounded in time
    held, pending = [], {}
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        held.append(s)
        pending[s.fileno()] = s
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + 20
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            s = pending.pop(fd)
            poller.unregister(fd)
            try:
                s.send(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            except OSError:
                pass
    return held

if mode == "slow":
    held = slow(int(rate))
    print("ready", len(held), flush=True)
    sys.stdin.readline()
    for s in held:
        s.close()
    sys.exit(0)

get("/metrics", right)
counts.clear()
print("ready", flush=True)
start = time.perf_counter()
end = start + seconds

def flood(path, auth):
    while time.perf_counter() < end:
        get(path, auth)

def held():
    kept = []
    while time.perf_counter() < end:
        try:
            kept.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            with lock:
                counts["held connections opened"] += 1
        except OSError:
            time.sleep(0.01)
        if len(kept) > 200:
            kept.pop(0).close()
    for s in kept:
        s.close()

def legit():
    # a polite scraper alongside the flood: does a legitimate scrape still get through, and how fast?
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        get("/metrics", right, "legit /metrics")
        with lock:
            counts["legit slowest ms"] = max(counts["legit slowest ms"], round(1000 * (time.perf_counter() - t0)))
        time.sleep(0.5)

if mode == "scrape":
    done = 0
    while time.perf_counter() < end:
        get("/metrics", right)
        done += 1
        delay = start + done / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
else:
    target = {"wrong": (flood, ("/metrics", wrong)), "metrics": (flood, ("/metrics", right)),
              "snapshot": (flood, ("/api/snapshot", right)), "held": (held, ())}[mode]
    threads = [threading.Thread(target=target[0], args=target[1]) for _ in range(workers)]
    threads.append(threading.Thread(target=legit))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
print(json.dumps(dict(counts)), flush=True)
"""


def _phase(tele: Telemetry, policy: BenchPolicy, optim: torch.optim.Optimizer, x: torch.Tensor,
           steps: int, seconds: float) -> float:  # fmt: skip
    """Train in whole updates for `seconds`; returns optimizer steps per second."""
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        with tele.update() as upd:
            for _ in range(steps):
                optim.zero_grad(set_to_none=True)
                policy(x).backward()
                upd.clip_grad_norm_(0.5)
                optim.step()
            upd.observe_kl({"op": torch.full((4,), 0.01)})
        done += steps
    return done / (time.perf_counter() - t0)


def _resources(pid: int) -> dict[str, int]:
    """RSS (KiB), OS threads and open fds of `pid`, from /proc (zeros once it has gone)."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return {
            "rss_kib": int(status["VmRSS"].split()[0]),
            "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
        }
    except (OSError, KeyError):
        return {"rss_kib": 0, "threads": 0, "fds": 0}


def _running(pid: int) -> int:
    """Threads of `pid` that are running or runnable now."""
    n = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            n += stat.rsplit(")", 1)[1].split()[0] == "R"
    except OSError:
        pass
    return n


def _load() -> tuple[float, int]:
    """The 1-minute load average and the number of threads running or runnable on the machine now."""
    fields = Path("/proc/loadavg").read_text().split()
    return float(fields[0]), int(fields[3].split("/")[0])


class _Sampler:
    """Every 0.1 s while a phase runs: peak resources of the trainer and the serving process, and the
    threads of other programs running (the machine's runnable threads less this benchmark's own)."""

    def __init__(self, ours: list[int], trainer: int, serving: int | None) -> None:
        self.ours, self.trainer, self.serving = ours, trainer, serving
        self.peak = {"trainer": _resources(trainer), "serving": _resources(serving) if serving else {}}
        self.others: list[int] = []
        self.load_end = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            _, running = _load()
            self.others.append(max(running - sum(_running(pid) for pid in self.ours), 0))
            for name, pid in (("trainer", self.trainer), ("serving", self.serving)):
                if pid:
                    now = _resources(pid)
                    self.peak[name] = (
                        {k: max(v, now[k]) for k, v in self.peak[name].items()} if self.peak[name] else now
                    )

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.load_end = _load()[0]


def _client(mode: str, port: int, rate: float, seconds: float, workers: int, nice: int) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", _CLIENT, mode, str(port), str(rate), str(seconds), str(workers), USER, PASSWORD]
    client = subprocess.Popen([*argv, str(nice)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    if not client.stdout.readline().startswith("ready"):
        client.kill()
        raise RuntimeError(f"the {mode} client did not start")
    return client


def _slow_scrapes(server: Server, counts: list[int], nice: int) -> list[dict[str, float]]:
    """For each count, hold that many partial requests and time five scrapes; the serving process's peak resources."""
    results = []
    auth = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    for n in counts:
        argv = [sys.executable, "-c", _CLIENT, "slow", str(server.port), str(n), "0", "0", USER, PASSWORD, str(nice)]
        client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout is not None and client.stdin is not None
            connected = int(client.stdout.readline().split()[1])
            times, peak = [], _resources(server.pid or 0)
            for _ in range(5):
                t0 = time.perf_counter()
                with urllib.request.urlopen(urllib.request.Request(server.url, headers=auth), timeout=30) as resp:
                    resp.read()
                times.append(time.perf_counter() - t0)
                now = _resources(server.pid or 0)
                peak = {k: max(v, now[k]) for k, v in peak.items()}
            client.stdin.write("done\n")
            client.stdin.flush()
            client.wait(30)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        results.append({"held": n, "connected": connected, "slowest_s": max(times), "load": _load()[0], **peak})
    return results


def run(
    rounds: int,
    seconds: float,
    rate: float,
    workers: int,
    steps: int = 32,
    client_nice: int = 10,
    slow: tuple[int, ...] = (300, 2000),
) -> dict[str, object]:
    """Interleave quiet, scrape and flood phases; medians, ratios, loads, answered requests and resources."""
    torch.manual_seed(0)
    policy = BenchPolicy(64, 128)
    tele = Telemetry(policy, heads=dict(policy.heads.items()))
    optim = torch.optim.Adam(policy.parameters(), lr=1e-4)
    x = torch.randn(256, 64)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    steps_per_s: dict[str, list[float]] = {name: [] for name in PHASES}
    others: dict[str, list[float]] = {name: [] for name in PHASES}
    loads: dict[str, list[float]] = {name: [] for name in PHASES}
    answered: dict[str, dict[str, int]] = {name: {} for name in PHASES if name != "quiet"}
    peaks: dict[str, list[dict[str, dict[str, int]]]] = {name: [] for name in PHASES}
    load_before = _load()[0]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "web.yml"
        config.write_text(f"basic_auth_users:\n  {USER}: {hashed}\n")
        server = serve(tele, 0, "127.0.0.1", web_config=config)
        try:
            _phase(tele, policy, optim, x, steps, min(seconds, 1.0))
            for _ in range(rounds):
                for name in PHASES:
                    client = None
                    if name != "quiet":
                        client = _client(name, server.port, rate, seconds, workers, client_nice)
                    ours = [os.getpid(), server.pid or 0] + ([client.pid] if client else [])
                    try:
                        with _Sampler(ours, os.getpid(), server.pid) as sampler:
                            steps_per_s[name].append(_phase(tele, policy, optim, x, steps, seconds))
                        peaks[name].append(sampler.peak)
                        others[name].append(statistics.fmean(sampler.others) if sampler.others else 0.0)
                        loads[name].append(sampler.load_end)
                        if client is not None:
                            assert client.stdout is not None
                            for key, n in json.loads(client.stdout.readline()).items():
                                merge = max if key.endswith(" ms") else int.__add__
                                answered[name][key] = merge(answered[name].get(key, 0), n)
                    finally:
                        if client is not None:
                            if client.poll() is None:
                                client.kill()
                            client.wait()
            slow_results = _slow_scrapes(server, list(slow), client_nice)
        finally:
            server.close()
            tele.close()
    quiet = statistics.median(steps_per_s["quiet"])
    return {
        "load_before": load_before,
        "steps_per_s": {k: statistics.median(v) for k, v in steps_per_s.items()},
        "ratio": {k: statistics.median(v) / quiet for k, v in steps_per_s.items() if k != "quiet"},
        "load": {k: max(v) for k, v in loads.items()},
        "others": {k: statistics.fmean(v) for k, v in others.items()},
        "answered": answered,
        "peak": {
            k: {who: {r: max(p[who].get(r, 0) for p in v) for r in ("threads", "fds", "rss_kib")} for who in v[0]}
            for k, v in peaks.items()
        },
        "slow": slow_results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the six phases")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=100.0, help="scrapes per second in the scrape phase")
    parser.add_argument("--workers", type=int, default=8, help="clients per flood")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per published update")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--nice", type=int, default=connections.SERVE_NICE, help="nice of the serving process")
    parser.add_argument("--client-nice", type=int, default=10, help="nice of the client processes")
    parser.add_argument("--slow", default="300,2000", help="counts of held partial requests to time scrapes behind")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    connections.SERVE_NICE = args.nice
    slow = tuple(int(n) for n in args.slow.split(",") if n)
    r = run(args.rounds, args.seconds, args.rate, args.workers, args.steps, args.client_nice, slow)
    print(
        f"flood: {args.rounds} rounds x {len(PHASES)} phases of {args.seconds:g} s, {args.rate:g} scrapes/s, "
        f"{args.workers} clients per flood at nice {args.client_nice}, max_connections {DEFAULT_MAX_CONNECTIONS}, "
        f"serving nice {args.nice}, torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs"
    )
    load_before = r["load_before"]
    assert isinstance(load_before, float)
    quiet_machine = load_before <= NOISY_LOAD
    print(
        f"load average before the run: {load_before:.2f}"
        + ("" if quiet_machine else f" > {NOISY_LOAD}: the machine is not quiet, so every ratio below is NOISY")
    )
    steps, ratio, load, others = r["steps_per_s"], r["ratio"], r["load"], r["others"]
    assert isinstance(steps, dict) and isinstance(ratio, dict) and isinstance(load, dict) and isinstance(others, dict)
    print("steps/s (medians): " + "  ".join(f"{k} {v:.1f}" for k, v in steps.items()))
    for phase, value in ratio.items():
        background = max(others[phase], others["quiet"])
        noisy = not quiet_machine or background > NOISY_LOAD
        verdict = "NOISY, not a measurement" if noisy else ("meets" if value >= TARGETS[phase] else "MISSES")
        print(
            f"ratio {phase}/quiet: {value:.3f} (target >= {TARGETS[phase]:.2f}, {verdict})  "
            f"load average {max(load[phase], load['quiet']):.2f}, other programs running {background:.2f}"
        )
    answered = r["answered"]
    assert isinstance(answered, dict)
    for phase, counts in answered.items():
        print(f"answered in {phase}: " + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())))
    peak = r["peak"]
    assert isinstance(peak, dict)
    for phase, who in peak.items():
        print(
            f"peak in {phase}: "
            + "; ".join(f"{w} " + ", ".join(f"{k} {v}" for k, v in res.items()) for w, res in who.items())
        )
    slow_results = r["slow"]
    assert isinstance(slow_results, list)
    for s in slow_results:
        target = SLOW_TARGETS.get(int(s["held"]))
        goal = f" (target < {target:g} s)" if target else ""
        print(
            f"held {s['held']} partial requests ({s['connected']} connected): "
            f"slowest of 5 scrapes {s['slowest_s']:.3f} s{goal}; "
            f"serving process peak threads {s['threads']}, fds {s['fds']}; load average {s['load']:.2f}"
            + ("" if quiet_machine else " (NOISY)")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
