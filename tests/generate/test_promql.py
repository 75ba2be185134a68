"""The PromQL building blocks, string for string: numbers, selectors, level starts and their fallback."""

from __future__ import annotations

import math

import pytest

from tele_exporter.catalog import Interval, MetricSpec, default_catalog
from tele_exporter.generate import promql

THRESHOLD = "tele_threshold"


def starts(spec_id: str, at: str = "") -> promql.RunStarts:
    """The run starts of a catalog metric, its tele_threshold selected by metric and level only."""
    spec: MetricSpec = default_catalog()[spec_id]
    return promql.RunStarts(spec, lambda level: promql.threshold_selector(THRESHOLD, spec.name, level), at)


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        (0.015, "0.015"),
        (1e-8, "1e-08"),
        (5.0, "5"),
        (0.0, "0"),
        (-0.005, "-0.005"),
        (600.0, "600"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_number_literals(value: float, literal: str) -> None:
    assert promql.number(value) == literal


def test_number_literals_round_trip() -> None:
    for value in (0.015, 0.03, 5.0, 10.0, 0.1, 2.0, 600.0, 1e-8, 1 / 3, 1e22, math.inf, -math.inf):
        assert float(promql.number(value).replace("Inf", "inf")) == value


def test_bucket_bounds_are_the_labels_the_client_writes() -> None:
    assert promql.bucket_bound(10.0) == "10.0"
    assert promql.bucket_bound(0.015) == "0.015"
    assert promql.bucket_bound(math.inf) == "+Inf"


def test_selector_matchers_then_labels_in_order() -> None:
    assert promql.selector("up") == "up"
    assert promql.selector("up", matchers=['job="tele"']) == 'up{job="tele"}'
    assert (
        promql.selector("tele_x", {"metric": "m", "level": "warning"}, matchers=['job=~"$job"'])
        == 'tele_x{job=~"$job", metric="m", level="warning"}'
    )
    assert promql.selector("tele_x", {"clip": 'a"b\\c'}) == 'tele_x{clip="a\\"b\\\\c"}'


def test_matcher_operators() -> None:
    assert promql.matcher("rank", "", "!=") == 'rank!=""'
    assert promql.matcher("job", "$job", "=~") == 'job=~"$job"'


def test_threshold_selector_of_one_level_or_all() -> None:
    assert (
        promql.threshold_selector(THRESHOLD, "tele_kl_divergence", "warning", matchers=['job="tele"'])
        == 'tele_threshold{job="tele", metric="tele_kl_divergence", level="warning"}'
    )
    assert promql.threshold_selector(THRESHOLD, "tele_kl_divergence") == 'tele_threshold{metric="tele_kl_divergence"}'


def test_ignoring() -> None:
    assert promql.ignoring(["env", "slot", "metric", "level"]) == "ignoring (env, slot, metric, level)"
    assert starts("seed_grad_ratio").ignoring == "ignoring (env, slot, metric, level)"


def test_a_closed_start_is_compared_with_greater_or_equal() -> None:
    """KL's warning level is [0.015, 0.03): a run's warning start is included."""
    assert starts("kl_divergence").compare(">=", "warning", 0.015) == (
        '>= ignoring (metric, level) group_left tele_threshold{metric="tele_kl_divergence", level="warning"}'
    )


def test_an_open_start_is_compared_with_greater_than() -> None:
    """The gradient norm's warning level is (5.0, 10.0]: a run's warning start is excluded; `bool` gives 0/1."""
    assert starts("policy_grad_norm", " @ end()").compare(">", "warning", 5.0, boolean=True, sep="\n  ") == (
        "> bool ignoring (clip, metric, level) group_left\n"
        '  tele_threshold{metric="tele_policy_grad_norm", level="warning"} @ end()'
    )


def test_a_start_no_run_may_move_is_the_catalog_constant() -> None:
    """Levels starting at 0 are not exported as tele_threshold: they compare with the number."""
    gradient = starts("policy_grad_norm")
    assert gradient.movable == {"healthy", "warning", "critical"}
    assert gradient.compare(">=", "vanishing", 0.0) == ">= 0"
    assert gradient.compare(">", "vanishing", 1e-8, boolean=True) == "> bool 1e-08"


def test_runs_without_thresholds_fall_back_to_the_catalog() -> None:
    assert starts("policy_grad_norm").unless_own() == (
        'unless ignoring (clip, metric, level) tele_threshold{metric="tele_policy_grad_norm"}'
    )
    assert starts("kl_divergence", " @ end()").unless_own(sep="\n  ") == (
        'unless ignoring (metric, level)\n  tele_threshold{metric="tele_kl_divergence"} @ end()'
    )


def test_operators_of_open_and_closed_ends() -> None:
    assert (promql.low_op(True), promql.low_op(False)) == (">=", ">")
    assert (promql.high_op(True), promql.high_op(False)) == ("<=", "<")
    assert promql.comparison(">", boolean=True) == "> bool"


@pytest.mark.parametrize(
    ("text", "filters"),
    [
        ("(5.0, 10.0]", "> 5 <= 10"),
        ("[0.1, 5.0]", ">= 0.1 <= 5"),
        ("[0.015, 0.03)", ">= 0.015 < 0.03"),
        ("(0, 0.5)", "> 0 < 0.5"),
        ("(10.0, +inf]", "> 10"),
        ("(10.0, +inf)", "> 10 < +Inf"),
        ("[0, 0.1)", ">= 0 < 0.1"),
    ],
)
def test_interval_filter_keeps_both_ends_exact(text: str, filters: str) -> None:
    assert promql.interval_filter(Interval.parse(text)) == filters


@pytest.mark.parametrize(
    ("text", "indicator"),
    [
        ("(-0.01, 0.01]", "(x > bool -0.01) * (x <= bool 0.01)"),
        ("[0.5, +inf]", "(x >= bool 0.5)"),
        ("[-inf, +inf]", "(x >= bool -Inf)"),
    ],
)
def test_indicator_is_one_inside_the_interval(text: str, indicator: str) -> None:
    assert promql.indicator("x", Interval.parse(text)) == indicator
