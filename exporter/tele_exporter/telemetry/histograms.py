"""Host-side histogram accumulation with Prometheus `le` bucket semantics.

Observations arrive once per PPO update. Large batches (a value per step and head)
are bucketed with one batched `searchsorted` + `bincount` for all series of a family
(`bucket_columns`), whose counts come back in the publish's one read; small lists
(KL, clip fractions, seed ratios) are bucketed in Python with `bisect`. Counts are
plain ints, so reading a histogram never touches a tensor.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ..snapshot import HistogramState


class HistogramSeries:
    """Bucket counts and the finite sum of one labelled histogram series.

    NaN observations are skipped (they are counted as non-finite elsewhere);
    +Inf lands in the +Inf bucket but not in the sum, which stays usable by rate().
    """

    def __init__(self, edges: Sequence[float]) -> None:
        self.edges = tuple(float(e) for e in edges)
        self._counts = [0] * (len(self.edges) + 1)
        self._sum = 0.0

    def observe_values(self, values: Iterable[float]) -> None:
        """Add host floats: the first edge >= value (`le`) counts it; NaN is skipped, +-Inf not summed."""
        for v in values:
            if math.isnan(v):
                continue
            self._counts[bisect.bisect_left(self.edges, v)] += 1
            if math.isfinite(v):
                self._sum += v

    def observe_many(self, values: Tensor) -> None:
        """Add a 1-d float64 CPU tensor of observations (one read of its values)."""
        self.observe_values(values.tolist())

    def add(self, counts: Sequence[int], total: float) -> None:
        """Add per-bucket counts (one per edge, then +Inf) and a finite sum, as bucket_columns makes them."""
        for i, c in enumerate(counts):
            self._counts[i] += int(c)
        self._sum += total

    def state(self) -> HistogramState:
        cumulative, running = [], 0
        for c in self._counts:
            running += c
            cumulative.append(running)
        return HistogramState(self.edges, tuple(cumulative), self._sum)


class LabelledHistogram:
    """A histogram family: one HistogramSeries per label-value tuple."""

    def __init__(self, edges: Sequence[float]) -> None:
        self.edges = tuple(edges)
        self.edges_tensor = torch.tensor(self.edges, dtype=torch.float64)
        self._series: dict[tuple[str, ...], HistogramSeries] = {}
        self._lock = threading.Lock()

    def series(self, labels: tuple[str, ...]) -> HistogramSeries:
        """The series of `labels`, created empty (and so exported) if new."""
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = HistogramSeries(self.edges)
            return series

    def observe_values(self, labels: tuple[str, ...], values: Iterable[float]) -> None:
        series = self.series(labels)
        with self._lock:
            series.observe_values(values)

    def observe_many(self, labels: tuple[str, ...], values: Tensor) -> None:
        self.observe_values(labels, values.tolist())

    def add(self, labels: tuple[str, ...], counts: Sequence[int], total: float) -> None:
        series = self.series(labels)
        with self._lock:
            series.add(counts, total)

    def ensure(self, labels: tuple[str, ...]) -> None:
        """Create an empty series so that it is exported before its first observation."""
        self.series(labels)

    def states(self) -> dict[tuple[str, ...], HistogramState]:
        with self._lock:
            return {labels: s.state() for labels, s in self._series.items()}


def bucket_columns(values: Tensor, mask: Tensor, edges: Tensor) -> tuple[Tensor, Tensor]:
    """Per column of `values` [n, k]: bucket counts [k, len(edges) + 1] and the finite sum [k], in one batch.

    Only entries where `mask` is True count; NaN is skipped and +-Inf counted but not
    summed, as HistogramSeries does. A fixed number of ops whatever k and n.
    """
    n_buckets = edges.numel() + 1
    k = values.shape[1]
    counted = mask & ~values.isnan()
    index = torch.searchsorted(edges, values.contiguous()) + torch.arange(k) * n_buckets
    counts = torch.bincount(index[counted], minlength=k * n_buckets).reshape(k, n_buckets)
    sums = torch.where(counted & values.isfinite(), values, 0.0).sum(0)
    return counts, sums
