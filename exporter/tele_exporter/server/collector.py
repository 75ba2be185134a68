"""A prometheus_client Collector that builds the TELE metric families at scrape time.

Names, types, help and labels come from the catalog; values come from a single
Snapshot read once per scrape, so a scrape never mixes two updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..catalog.model import MetricSpec
from ..catalog.thresholds import THRESHOLD_METRIC, exported
from ..snapshot import GRADIENT_STATES, Snapshot
from .build_info import build_info
from .source import SnapshotSource

Samples = list[tuple[tuple[str, ...], float]]


def _head_current(s: Snapshot) -> Samples:
    return [((h.name, h.kind), h.current) for h in s.heads] if s.updates else []


def _head_prev(s: Snapshot) -> Samples:
    return [((h.name, h.kind), h.prev) for h in s.heads] if s.updates else []


def _policy_grad_norm(s: Snapshot) -> Samples:
    if s.grad_norm_pre is None or s.grad_norm_post is None:
        return []
    return [(("pre",), s.grad_norm_pre), (("post",), s.grad_norm_post)]


def _seed(field: str) -> Callable[[Snapshot], Samples]:
    """One sample per watched seed that has the value (a backward gain never measured is missing, not 0)."""

    def samples(s: Snapshot) -> Samples:
        values = ((seed, getattr(seed, field)) for seed in s.seeds)
        return [((seed.env, seed.slot), float(value)) for seed, value in values if value is not None]

    return samples


def _scalar(field: str) -> Callable[[Snapshot], Samples]:
    """One unlabelled sample, or none while the value is missing (None)."""

    def samples(s: Snapshot) -> Samples:
        value = getattr(s, field)
        return [] if value is None else [((), float(value))]

    return samples


def _policy(field: str) -> Callable[[Snapshot], Samples]:
    """One unlabelled sample of the policy-health state, or none while it is missing."""

    def samples(s: Snapshot) -> Samples:
        value = getattr(s.policy, field)
        return [] if value is None else [((), float(value))]

    return samples


def _policy_heads(field: str) -> Callable[[Snapshot], Samples]:
    """One sample per head that has the value (a head without it is missing, not 0)."""

    def samples(s: Snapshot) -> Samples:
        return [((head,), value) for head, value in getattr(s.policy, field).items()]

    return samples


def _nonfinite_steps(s: Snapshot) -> Samples:
    """Per head, the optimizer steps with a NaN norm and those with an Inf one, counted apart (0 is a count)."""
    return [((h.name, h.kind, v), float(n)) for h in s.heads for v, n in (("nan", h.nan_total), ("inf", h.inf_total))]


def _first_nonfinite(s: Snapshot) -> Samples:
    """The latest update's first non-finite step, on the head(s) non-finite there only (absent for the others)."""
    return [((h.name, h.kind), float(h.first_nonfinite_step)) for h in s.heads if h.first_nonfinite_step is not None]


def _gradient_state(s: Snapshot) -> Samples:
    """Per head, 1 for its state in the latest update and 0 for the others; nothing before the first update."""
    return [
        ((h.name, h.kind, state), 1.0 if h.state == state else 0.0)
        for h in s.heads
        if h.state is not None
        for state in GRADIENT_STATES
    ]


def _clip_sides(s: Snapshot) -> Samples:
    p = s.policy
    if p.clip_fraction_high is None or p.clip_fraction_low is None:
        return []
    return [(("high",), p.clip_fraction_high), (("low",), p.clip_fraction_low)]


# Where each catalog metric's value comes from in a Snapshot, by catalog id.
SOURCES: dict[str, Callable[[Snapshot], Samples]] = {
    "head_grad_norm": _head_current,
    "head_grad_norm_prev": _head_prev,
    "policy_grad_norm": _policy_grad_norm,
    "gradient_cv": _scalar("gradient_cv"),
    "kl_divergence": _scalar("kl"),
    "clip_fraction": _scalar("clip_fraction"),
    "clip_fraction_side": _clip_sides,
    "policy_entropy": _policy("entropy"),
    "entropy_collapsed": _policy("entropy_collapsed"),
    "entropy_velocity": _policy("entropy_velocity"),
    "head_entropy": _policy_heads("head_entropy"),
    "explained_variance": _policy("explained_variance"),
    "advantage_std": _policy("advantage_std"),
    "head_ratio_max": _policy_heads("head_ratio_max"),
    "policy_std": _policy("action_std"),
    "seed_grad_ratio": _seed("ratio"),
    "seed_backward_gain": _seed("backward_gain"),
    "seed_gradient_vanishing": _seed("vanishing"),
    "seed_gradient_exploding": _seed("exploding"),
    "ppo_updates": _scalar("updates"),
    "ppo_early_stops": _scalar("early_stops"),
    "last_update_timestamp": _scalar("timestamp"),
    "nonfinite_gradients": _nonfinite_steps,
    "nonfinite_first_step": _first_nonfinite,
    "head_gradient_state": _gradient_state,
    "head_clip_fraction": _policy_heads("head_clip_fraction"),
    "log_prob_min": _policy("log_prob_min"),
    "log_prob_max": _policy("log_prob_max"),
    "seeds_refused": _scalar("seeds_refused"),
    "entropy_normalized": _policy("entropy_normalized"),
    "alert_scale": lambda s: [((s.alert_scale,), 1.0)],
    "run_finished": lambda s: [((), 1.0 if s.finished else 0.0)],
    "layer_grad_norm": lambda s: [((layer.name,), layer.grad_norm) for layer in s.layers if layer.steps],
    "dead_layers": _scalar("dead_layers"),
    "head_update_ratio": lambda s: [
        ((h.name, h.kind), h.update_ratio) for h in s.heads if h.update_ratio is not None and s.updates
    ],
    "layer_update_ratio": lambda s: [
        ((layer.name,), layer.update_ratio) for layer in s.layers if layer.update_ratio is not None
    ],
}


class TeleCollector(Collector):
    """Yields every catalog metric of one source (a Telemetry) from its latest snapshot.

    `world_size` and `restarts` (None: not under torchrun) are the process's launch
    facts, read by the caller: finding them needs torch.distributed, which this layer never imports.
    """

    def __init__(self, source: SnapshotSource, *, world_size: int, restarts: int | None) -> None:
        self._source = source
        # Facts of the process's launch, the same at every scrape.
        self._static: dict[str, Samples] = {
            "world_size": [((), float(world_size))],
            "build_info": [(build_info(), 1.0)],
            "torchrun_restarts": [] if restarts is None else [((), float(restarts))],
            # The run's own level starts (Telemetry(thresholds=...)), which the alert rules compare against.
            THRESHOLD_METRIC: [((name, level), start) for name, level, start in exported(source.catalog)],
        }
        missing = [
            spec.id
            for spec in source.catalog
            if spec.type != "histogram"
            and spec.id not in SOURCES
            and spec.id not in self._static
            and spec.id != "telemetry_errors"
        ]
        if missing:
            raise ValueError(f"catalog metrics without a source in the collector: {missing}")

    def describe(self) -> Iterator[Metric]:
        for spec in self._source.catalog:
            yield self._histogram(spec) if spec.type == "histogram" else self._scalar(spec)

    def collect(self) -> Iterator[Metric]:
        snap = self._source.snapshot()
        errors = self._source.errors()
        for spec in self._source.catalog:
            if spec.type == "histogram":
                histogram = self._histogram(spec)
                for labels, state in snap.histograms.get(spec.id, {}).items():
                    buckets: list[tuple[str, float]] = [
                        (_le(e), c) for e, c in zip(state.edges, state.cumulative, strict=False)
                    ]
                    buckets.append(("+Inf", state.cumulative[-1]))
                    histogram.add_metric(self._values(labels), buckets, state.total)
                yield histogram
                continue
            family = self._scalar(spec)
            if spec.id == "telemetry_errors":
                for site, count in sorted(errors.items()):
                    family.add_metric(self._values((site,)), count)
            else:
                samples = self._static[spec.id] if spec.id in self._static else SOURCES[spec.id](snap)
                for labels, value in samples:
                    family.add_metric(self._values(labels), value)
            yield family

    def _values(self, labels: tuple[str, ...]) -> list[str]:
        return [*labels, *self._source.const_labels.values()]

    def _labels(self, spec: MetricSpec) -> list[str]:
        return [*spec.labels, *self._source.const_labels]

    def _scalar(self, spec: MetricSpec) -> GaugeMetricFamily | CounterMetricFamily:
        kind = CounterMetricFamily if spec.type == "counter" else GaugeMetricFamily
        return kind(spec.family_name, spec.help, labels=self._labels(spec), unit=spec.unit)

    def _histogram(self, spec: MetricSpec) -> HistogramMetricFamily:
        return HistogramMetricFamily(spec.family_name, spec.help, labels=self._labels(spec), unit=spec.unit)


def _le(edge: float) -> str:
    """Bucket bound as client_python formats it (1.0, 0.015, 1000.0)."""
    return repr(float(edge))
