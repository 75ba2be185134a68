"""Training throughput while clients scrape politely or flood the exporter, against no clients at all.

A training loop (the `tele-exporter bench` 8-head policy, one published update
every --steps steps) runs in interleaved phases of --seconds each, in one run:
quiet (no client); scrape (a separate process GETs /metrics with the right
password at --rate per second); requests (a separate process, as fast as it can
on --workers threads per kind: wrong passwords, new each time; /metrics?x=N, a
new URL each time; /api/snapshot); held (connections opened as fast as the
exporter takes them and held, never sending a request, up to 200 at a time).
Flood phases also scrape politely twice a second and report the slowest. The
exporter has basic auth with a bcrypt cost-10 hash and the default connection
cap. With --child, a fifth phase scrapes a separate process serving the same
bytes with http.server, the floor that moving serving out of the trainer
could reach. Printed: median steps/s per phase, the ratios to quiet, the requests each
phase answered by status, and the trainer's peak RSS, threads and open fds (one of
the threads is the benchmark's own sampler).

    python benchmarks/flood.py [--rounds 5] [--seconds 3] [--rate 100] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bcrypt
import torch
from prometheus_client import generate_latest

from tele_exporter.bench import BenchPolicy
from tele_exporter.server import connections
from tele_exporter.server.http import DEFAULT_MAX_CONNECTIONS, serve
from tele_exporter.telemetry.telemetry import Telemetry

USER, PASSWORD = "prometheus", "correct horse battery staple"
PHASES = ("quiet", "scrape", "requests", "held")

# For --child: the same bytes served by a separate process, the floor a serving child process could reach.
_CHILD = r"""
import http.server, sys
data = open(sys.argv[1], "rb").read()

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

_CLIENT = r"""
import base64, collections, json, random, socket, sys, threading, time, urllib.error, urllib.request
mode, base, rate, seconds, workers, user, password = sys.argv[1:8]
rate, seconds, workers = float(rate), float(seconds), int(workers)
port = int(base.rsplit(":", 1)[1])
counts = collections.Counter()
lock = threading.Lock()

def auth(pw):
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()

def get(path, pw):
    req = urllib.request.Request(base + path, headers={"Authorization": auth(pw)})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            resp.read()
            code = resp.status
    except urllib.error.HTTPError as err:
        code = err.code
    except OSError:
        code = "error"
    with lock:
        counts[f"{path.split('?')[0]} {code}"] += 1

get("/metrics", password)
print("ready", flush=True)
start = time.perf_counter()
end = start + seconds

def wrong():
    while time.perf_counter() < end:
        get("/metrics", f"guess-{random.random()}")

def uncached():
    n = 0
    while time.perf_counter() < end:
        n += 1
        get(f"/metrics?x={random.random()}", password)

def snapshots():
    while time.perf_counter() < end:
        get("/api/snapshot", password)

def hold():
    held = []
    while time.perf_counter() < end:
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            with lock:
                counts["held connections opened"] += 1
        except OSError:
            time.sleep(0.01)
        if len(held) > 200:
            held.pop(0).close()
    for s in held:
        s.close()

def legit():
    # a polite scraper alongside the flood: does a legitimate scrape still get through, and how fast?
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        get("/metrics#legit", password)
        with lock:
            counts["legit slowest ms"] = max(counts["legit slowest ms"], round(1000 * (time.perf_counter() - t0)))
        time.sleep(0.5)

if mode == "scrape":
    done = 0
    while time.perf_counter() < end:
        get("/metrics", password)
        done += 1
        delay = start + done / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
else:
    kinds = (wrong, uncached, snapshots) if mode == "requests" else (hold,)
    threads = [threading.Thread(target=f) for f in kinds for _ in range(workers)] + [threading.Thread(target=legit)]
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


def _resources() -> dict[str, int]:
    """This process's RSS (KiB), OS threads and open fds, from /proc."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {
        "rss_kib": int(status["VmRSS"].split()[0]),
        "threads": int(status["Threads"]),
        "fds": len(os.listdir("/proc/self/fd")),
    }


class _Sampler:
    """The largest RSS, thread count and fd count seen while a phase runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        self.peak = _resources()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            now = _resources()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _client(mode: str, base: str, rate: float, seconds: float, workers: int) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", _CLIENT, mode, base, str(rate), str(seconds), str(workers), USER, PASSWORD]
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    if client.stdout.readline().strip() != "ready":
        client.kill()
        raise RuntimeError(f"the {mode} client did not start")
    return client


def run(
    rounds: int, seconds: float, rate: float, workers: int, steps: int = 32, child: bool = False
) -> dict[str, object]:
    """Interleave quiet, scrape and flood phases; medians, ratios, answered requests and resources."""
    names = (*PHASES, "scrape_child") if child else PHASES
    torch.manual_seed(0)
    policy = BenchPolicy(64, 128)
    tele = Telemetry(policy, heads=dict(policy.heads.items()))
    optim = torch.optim.Adam(policy.parameters(), lr=1e-4)
    x = torch.randn(256, 64)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    phases: dict[str, list[float]] = {name: [] for name in names}
    answered: dict[str, dict[str, int]] = {name: {} for name in names if name != "quiet"}
    resources: dict[str, list[dict[str, int]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "web.yml"
        config.write_text(f"basic_auth_users:\n  {USER}: {hashed}\n")
        server = serve(tele, 0, "127.0.0.1", web_config=config)
        side = None
        try:
            _phase(tele, policy, optim, x, steps, min(seconds, 1.0))
            bases = {name: server.base_url for name in names}
            if child:
                body = Path(tmp) / "metrics"
                body.write_bytes(generate_latest(tele.registry))
                side = subprocess.Popen([sys.executable, "-c", _CHILD, str(body)], stdout=subprocess.PIPE, text=True)
                assert side.stdout is not None
                bases["scrape_child"] = f"http://127.0.0.1:{int(side.stdout.readline())}"
            for _ in range(rounds):
                for name in phases:
                    mode = "scrape" if name == "scrape_child" else name
                    client = None if name == "quiet" else _client(mode, bases[name], rate, seconds, workers)
                    try:
                        with _Sampler() as sampler:
                            phases[name].append(_phase(tele, policy, optim, x, steps, seconds))
                        resources[name].append(sampler.peak)
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
        finally:
            if side is not None:
                side.kill()
                side.wait()
            server.close()
            tele.close()
    quiet = statistics.median(phases["quiet"])
    return {
        "steps_per_s": {k: statistics.median(v) for k, v in phases.items()},
        "ratio": {k: statistics.median(v) / quiet for k, v in phases.items() if k != "quiet"},
        "answered": answered,
        "resources": {k: {r: max(d[r] for d in v) for r in v[0]} for k, v in resources.items()},
        "python_threads_now": threading.active_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (quiet, scrape, requests, held) phases")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=100.0, help="scrapes per second in the scrape phase")
    parser.add_argument("--workers", type=int, default=4, help="threads per kind of flood")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per published update")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--child", action="store_true", help="add a phase scraping a child process serving bytes")
    parser.add_argument("--nice", type=int, default=connections.SERVE_NICE, help="nice of the serving threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    connections.SERVE_NICE = args.nice
    r = run(args.rounds, args.seconds, args.rate, args.workers, args.steps, args.child)
    print(
        f"flood: {args.rounds} rounds x 4 phases of {args.seconds:g} s, {args.rate:g} scrapes/s, "
        f"{args.workers} flood threads per kind, max_connections {DEFAULT_MAX_CONNECTIONS}, serving nice {args.nice}, "
        f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs"
    )
    steps, ratio = r["steps_per_s"], r["ratio"]
    assert isinstance(steps, dict) and isinstance(ratio, dict)
    print("steps/s (medians): " + "  ".join(f"{k} {v:.1f}" for k, v in steps.items()))
    for phase, value in ratio.items():
        print(f"ratio {phase}/quiet: {value:.3f}")
    answered = r["answered"]
    assert isinstance(answered, dict)
    for phase, counts in answered.items():
        print(f"answered in {phase}: " + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())))
    resources = r["resources"]
    assert isinstance(resources, dict)
    for phase, res in resources.items():
        print(f"trainer peak in {phase}: " + ", ".join(f"{k} {v}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
