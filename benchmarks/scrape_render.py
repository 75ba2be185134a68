"""Scrape render time against the number of seed series, and against a plain prometheus_client registry.

For 8 heads plus N watched seeds (N = 16, 256, 4096 by default), one published
update, this times `generate_latest` of the Telemetry's registry and of an
equivalent plain registry: prometheus_client Gauge/Counter/Histogram objects
holding the same families, label sets and bucket edges. Printed as ratios.

    python benchmarks/scrape_render.py [--seeds 16,256,4096] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from torch import nn

from tele_exporter.bench import BenchPolicy
from tele_exporter.telemetry.telemetry import SeedWatch, Telemetry


def instrumented(seeds: int) -> tuple[Telemetry, list[SeedWatch]]:
    """A Telemetry over an 8-head policy with `seeds` watched seeds and one published update."""
    torch.manual_seed(0)
    policy = BenchPolicy(16, 32)
    tele = Telemetry(policy, heads=dict(policy.heads.items()), max_seeds=max(seeds, 1))
    module = nn.Linear(2, 2)
    watches = [tele.watch_seed(module, host=policy, env=str(i // 4), slot=f"r{i % 4}") for i in range(seeds)]
    with tele.update() as upd:
        policy(torch.randn(8, 16)).backward()
        upd.clip_grad_norm_(0.5)
        upd.observe_kl({"op": torch.full((4,), 0.01)})
    return tele, watches


def plain_mirror(tele: Telemetry) -> CollectorRegistry:
    """A plain registry with client objects holding every family and series the Telemetry exports."""
    registry = CollectorRegistry()
    for family in tele.registry.collect():
        series = [s for s in family.samples if not s.name.endswith(("_bucket", "_count", "_sum", "_created"))]
        if not family.samples:
            continue  # an empty family renders no samples on either side
        if family.type == "histogram":
            buckets = sorted(
                {float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")} - {float("inf")}
            )
            labelnames = [k for k in family.samples[0].labels if k != "le"] if family.samples else []
            hist = Histogram(family.name, family.documentation, labelnames, registry=registry, buckets=buckets)
            seen = {tuple(s.labels[k] for k in labelnames) for s in family.samples}
            for values in seen:
                (hist.labels(*values) if labelnames else hist).observe(0.01)
            continue
        labelnames = list(series[0].labels) if series else []
        if family.type == "counter":
            counter = Counter(family.name, family.documentation, labelnames, registry=registry)
            for s in series:
                (counter.labels(**s.labels) if labelnames else counter).inc(s.value)
        else:
            gauge = Gauge(family.name, family.documentation, labelnames, registry=registry)
            for s in series:
                (gauge.labels(**s.labels) if labelnames else gauge).set(s.value)
    return registry


def _render_seconds(registry: CollectorRegistry, repeat: int) -> tuple[float, int]:
    body = generate_latest(registry)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        generate_latest(registry)
        times.append(time.perf_counter() - t0)
    lines = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    return statistics.median(times), lines


def run(seed_counts: list[int], repeat: int) -> list[dict[str, float]]:
    """Median render seconds of both registries, interleaved, for each seed count."""
    disable_created_metrics()  # the Telemetry exports no _created series; neither does the mirror
    rows = []
    for n in seed_counts:
        tele, watches = instrumented(n)
        plain = plain_mirror(tele)
        tele_s, plain_s, tele_lines, plain_lines = [], [], 0, 0
        for _ in range(3):
            t, tele_lines = _render_seconds(tele.registry, repeat)
            p, plain_lines = _render_seconds(plain, repeat)
            tele_s.append(t)
            plain_s.append(p)
        for w in watches:
            w.remove()
        tele.close()
        t_med, p_med = statistics.median(tele_s), statistics.median(plain_s)
        rows.append(
            {
                "seeds": n,
                "tele_lines": tele_lines,
                "plain_lines": plain_lines,
                "tele_ms": t_med * 1e3,
                "plain_ms": p_med * 1e3,
                "ratio": t_med / p_med,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="16,256,4096", help="comma-separated seed counts")
    parser.add_argument("--repeat", type=int, default=20, help="renders per measurement")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.seeds.split(",") if x.strip()]
    print(f"scrape render (generate_latest), 8 heads + N seeds, median of {args.repeat} renders x 3 rounds")
    print(f"{'seeds':>6}{'tele n':>9}{'plain n':>9}{'tele ms':>10}{'plain ms':>10}{'ratio':>8}")
    for r in run(counts, args.repeat):
        print(
            f"{r['seeds']:>6}{r['tele_lines']:>9}{r['plain_lines']:>9}"
            f"{r['tele_ms']:>10.3f}{r['plain_ms']:>10.3f}{r['ratio']:>8.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
