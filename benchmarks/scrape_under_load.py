"""Training throughput while /metrics is scraped 100 times a second, against no scraping.

A training loop (the `tele-exporter bench` 8-head policy, Update.clip_grad_norm_
per step, one published update every --steps steps, --seeds watched seeds) runs
in alternating phases of --seconds each: without scraping, then while a separate
process GETs /metrics on 127.0.0.1 at --rate per second. Printed as the ratio of
optimizer steps per second, scraped / not scraped, from one run, with the 1-minute load
average beside it (marked NOISY above 1.5: the machine was not quiet).

    python benchmarks/scrape_under_load.py [--rounds 3] [--seconds 4] [--rate 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from tele_exporter.bench import BenchPolicy
from tele_exporter.server.http import serve
from tele_exporter.telemetry.telemetry import Telemetry

_SCRAPER = """
import sys, time, urllib.request
url, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
urllib.request.urlopen(url, timeout=5).read()
print("ready", flush=True)
ok = 0
start = time.perf_counter()
while time.perf_counter() - start < seconds:
    ok += len(urllib.request.urlopen(url, timeout=5).read()) > 0
    delay = start + ok / rate - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
print(ok / (time.perf_counter() - start), flush=True)
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


def run(rounds: int, seconds: float, rate: float, steps: int = 32, seeds: int = 16) -> dict[str, float]:
    """Alternate unscraped and scraped phases; returns median steps/s of each and their ratio."""
    torch.manual_seed(0)
    policy = BenchPolicy(64, 128)
    tele = Telemetry(policy, heads=dict(policy.heads.items()))
    seed_module = nn.Linear(2, 2)
    watches = [tele.watch_seed(seed_module, host=policy, env=str(i // 4), slot=f"r{i % 4}") for i in range(seeds)]
    optim = torch.optim.Adam(policy.parameters(), lr=1e-4)
    x = torch.randn(256, 64)
    server = serve(tele, 0, "127.0.0.1")
    quiet: list[float] = []
    scraped: list[float] = []
    rates: list[float] = []
    try:
        _phase(tele, policy, optim, x, steps, min(seconds, 1.0))
        for _ in range(rounds):
            quiet.append(_phase(tele, policy, optim, x, steps, seconds))
            scraper = subprocess.Popen(
                [sys.executable, "-c", _SCRAPER, server.url, str(rate), str(seconds)], stdout=subprocess.PIPE, text=True
            )
            try:
                assert scraper.stdout is not None
                if scraper.stdout.readline().strip() != "ready":
                    raise RuntimeError("the scraper did not start")
                scraped.append(_phase(tele, policy, optim, x, steps, seconds))
                rates.append(float(scraper.stdout.readline()))
            finally:
                if scraper.poll() is None:
                    scraper.kill()
                scraper.wait()
    finally:
        server.close()
        for w in watches:
            w.remove()
        tele.close()
    q, s = statistics.median(quiet), statistics.median(scraped)
    return {"quiet_steps_per_s": q, "scraped_steps_per_s": s, "ratio": s / q, "scrape_rate": min(rates)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="pairs of phases (unscraped, scraped)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=100.0, help="scrapes per second while scraped")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per published update")
    parser.add_argument("--seeds", type=int, default=16, help="watched seeds (series in each scrape)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    r = run(args.rounds, args.seconds, args.rate, args.steps, args.seeds)
    load = max(load_before, os.getloadavg()[0])
    print(
        f"scrape under load: {args.rounds} rounds x 2 phases of {args.seconds:g} s, {args.rate:g} scrapes/s, "
        f"{args.seeds} seeds, torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(f"steps/s unscraped {r['quiet_steps_per_s']:.1f}  scraped {r['scraped_steps_per_s']:.1f} (medians)")
    print(f"scrapes/s achieved (lowest phase): {r['scrape_rate']:.1f}")
    noisy = " NOISY: the machine was not quiet" if load > 1.5 else ""
    print(f"ratio scraped/unscraped: {r['ratio']:.4f}  load average {load:.2f}{noisy}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
