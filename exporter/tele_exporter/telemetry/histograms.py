"""Host-side histogram accumulation with Prometheus `le` bucket semantics.

Observations arrive in batches once per PPO update (already on the host), so
bucketing is one vectorised searchsorted per batch rather than a call per step.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

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
        self._edges_t = torch.tensor(self.edges, dtype=torch.float64)
        self._counts = torch.zeros(len(self.edges) + 1, dtype=torch.int64)
        self._sum = 0.0

    def observe_many(self, values: Tensor) -> None:
        """Add a 1-d float64 CPU tensor of observations."""
        values = values[~torch.isnan(values)]
        if values.numel() == 0:
            return
        idx = torch.searchsorted(self._edges_t, values)  # first edge >= value: `le` semantics
        self._counts += torch.bincount(idx, minlength=len(self.edges) + 1)
        finite = values[torch.isfinite(values)]
        self._sum += float(finite.sum())

    def state(self) -> HistogramState:
        return HistogramState(self.edges, tuple(int(c) for c in self._counts.cumsum(0)), self._sum)


class LabelledHistogram:
    """A histogram family: one HistogramSeries per label-value tuple."""

    def __init__(self, edges: Sequence[float]) -> None:
        self.edges = tuple(edges)
        self._series: dict[tuple[str, ...], HistogramSeries] = {}
        self._lock = threading.Lock()

    def observe_many(self, labels: tuple[str, ...], values: Tensor) -> None:
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = HistogramSeries(self.edges)
            series.observe_many(values)

    def ensure(self, labels: tuple[str, ...]) -> None:
        """Create an empty series so that it is exported before its first observation."""
        with self._lock:
            self._series.setdefault(labels, HistogramSeries(self.edges))

    def states(self) -> dict[tuple[str, ...], HistogramState]:
        with self._lock:
            return {labels: s.state() for labels, s in self._series.items()}
