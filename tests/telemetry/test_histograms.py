"""histogram: Prometheus `le` semantics, NaN skipped, Inf in +Inf but not in the sum."""

from __future__ import annotations

import math

import torch

from tele_exporter.telemetry.histograms import HistogramSeries, LabelledHistogram


def test_le_semantics_put_a_value_equal_to_an_edge_in_that_bucket() -> None:
    h = HistogramSeries([0.015, 0.03])
    h.observe_many(torch.tensor([0.015, 0.0150001, 0.03, 1.0], dtype=torch.float64))
    state = h.state()
    assert state.cumulative == (1, 3, 4)
    assert state.total == 0.015 + 0.0150001 + 0.03 + 1.0


def test_nan_is_skipped_and_inf_counts_but_stays_out_of_the_sum() -> None:
    h = HistogramSeries([1.0])
    h.observe_many(torch.tensor([math.nan, math.inf, 0.5], dtype=torch.float64))
    assert h.state().cumulative == (1, 2)
    assert h.state().total == 0.5


def test_labelled_series_are_independent_and_ensure_creates_empty_ones() -> None:
    fam = LabelledHistogram([1.0])
    fam.ensure(("a",))
    fam.observe_many(("b",), torch.tensor([2.0], dtype=torch.float64))
    states = fam.states()
    assert states[("a",)].count == 0
    assert states[("b",)].cumulative == (0, 1)
