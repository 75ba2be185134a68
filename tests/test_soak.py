"""Soak: a thousand updates under constant scraping, and 10,000 seed germinate/prune cycles.

Zero failed scrapes, zero torn snapshots (prev(N) == current(N-1)), counters never
go down, pruned seeds' series disappear and memory stays bounded.
"""

from __future__ import annotations

import gc
import itertools
import os
import threading
import urllib.request

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from tele_exporter import Telemetry, serve

from .conftest import TinyPolicy, backward

UPDATES = 1000
SCRAPERS = 3
SEED_CYCLES = 10_000


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_scrapes_during_a_thousand_updates_are_whole_and_monotonic(policy: TinyPolicy, tele: Telemetry) -> None:
    server = serve(tele, port=0)
    currents: dict[int, float] = {}
    observations: list[list[tuple[int, float, float, float]]] = [[] for _ in range(SCRAPERS)]
    failures: list[BaseException] = []
    done = threading.Event()

    def scraper(out: list[tuple[int, float, float, float]]) -> None:
        while not done.is_set():
            try:
                with urllib.request.urlopen(server.url, timeout=10) as resp:
                    text = resp.read().decode()
                values = {
                    (s.name, s.labels.get("head")): s.value
                    for f in text_string_to_metric_families(text)
                    for s in f.samples
                }
                if ("tele_head_grad_norm", "op") in values:
                    out.append(
                        (
                            int(values[("tele_ppo_updates_total", None)]),
                            values[("tele_head_grad_norm", "op")],
                            values[("tele_head_grad_norm_prev", "op")],
                            values[("tele_step_head_grad_norm_count", "op")],
                        )
                    )
            except BaseException as exc:  # every failure is a finding
                failures.append(exc)

    threads = [threading.Thread(target=scraper, args=(obs,)) for obs in observations]
    for t in threads:
        t.start()
    try:
        for u in range(UPDATES):
            with tele.update() as upd:
                backward(policy, scale=1.0 + (u % 7), seed=u)
                upd.clip_grad_norm_(0.5)
            currents[u + 1] = tele.snapshot().head("op").current
    finally:
        done.set()
        for t in threads:
            t.join()
        server.close()
    scrapes = sum(len(o) for o in observations)
    print(f"\nsoak: {UPDATES} updates, {scrapes} scrapes by {SCRAPERS} threads, {len(failures)} failed")
    assert failures == []
    assert scrapes > 100
    for obs in observations:
        for (n, _, _, count), (n_next, _, _, count_next) in itertools.pairwise(obs):
            assert n_next >= n and count_next >= count  # counters never go down
        for n, current, prev, count in obs:
            assert current == currents[n]
            assert prev == currents.get(n - 1, 0.0)
            assert count == n  # one step per update, all in the histogram of the same snapshot


@pytest.mark.slow
def test_ten_thousand_germinate_prune_cycles_keep_memory_bounded(policy: TinyPolicy) -> None:
    tele = Telemetry(policy, heads={"op": policy.op}, max_seeds=64)
    host = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    rss: dict[int, int] = {}
    for cycle in range(SEED_CYCLES):
        seed = nn.Linear(8, 8)
        watch = tele.watch_seed(seed, host=host, env=cycle % 4, slot=f"s{cycle}")
        if cycle % 10 == 0:
            with tele.update():
                host(seed(x)).sum().backward()
            assert tele.snapshot().seed(str(cycle % 4), f"s{cycle}").ratio > 0
        watch.remove()
        if cycle + 1 in (1000, SEED_CYCLES):
            gc.collect()
            rss[cycle + 1] = _rss_bytes()
    growth = rss[SEED_CYCLES] - rss[1000]
    print(f"\nsoak: {SEED_CYCLES} germinate/prune cycles, RSS growth after warm-up {growth / 2**20:.2f} MiB")
    assert growth < 16 * 2**20
    text = generate_latest(tele.registry).decode()
    assert "tele_seed_grad_ratio{" not in text  # every pruned seed's series is gone
    assert tele.snapshot().seeds == ()
    tele.close()
