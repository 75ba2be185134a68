"""Catalog levels as Grafana field config: threshold steps, value mappings, display codes.

Grafana colours a value with the last threshold step whose value is <= it
(steps are ">= value"). Catalog levels state each boundary as open or closed. A
closed lower bound is a Grafana step as it is; an open lower bound a (the level is
"> a") becomes a step at the next float64 above a, math.nextafter(a, +inf), which is
exactly "> a" for every double Grafana can hold. Where each run has its own levels,
level_code_query() compares in PromQL with the catalog's operators instead.
"""

from __future__ import annotations

import math
from typing import Any

from ..catalog.model import Catalog, Interval, MetricSpec, Trend, duration_seconds
from .promql import RunStarts, comparison, high_op, indicator, low_op, number

Json = dict[str, Any]

# Codes the head-trend query returns; value mappings turn them into arrows.
TREND_NONE = 0
TREND_STABLE = 1


def step_value(interval: Interval) -> float:
    """The Grafana step value (">= v") that starts `interval`: its low end, or the next double."""
    return interval.low if interval.low_closed else math.nextafter(interval.low, math.inf)


def level_steps(catalog: Catalog, spec: MetricSpec) -> list[Json]:
    """Threshold steps colouring every value exactly as the catalog's levels do."""
    steps: list[Json] = []
    for level in spec.levels:
        value: float | None = None if not steps else step_value(level.when)
        steps.append({"color": catalog.colour(level.status), "value": value})
    return steps


def level_code_query(starts: RunStarts, value: str) -> str:
    """PromQL giving each series the index of its level among its own run's levels; NaN stays NaN.

    If `starts` carries a modifier such as " @ end()", `value` should carry it too. Each
    level past the first adds (value >= start) or (value > start) as the catalog's interval
    says, so the index is exact at every boundary, as the alert rules' comparisons are; a
    run that exports no tele_threshold is held to the catalog's starts. NaN fails every
    comparison, so a NaN is returned as it is for the NaN mapping, `* 1` dropping its name:
    one series per run across time, whether its value was NaN or not.
    """
    own, fallback = [], []
    for level in starts.spec.levels[1:]:
        op = low_op(level.when.low_closed)
        fallback.append(f"({value} {comparison(op, True)} {number(level.when.low)})")
        own.append(f"({value} {starts.compare(op, level.name, level.when.low, boolean=True)})")
    runs = f"({' + '.join(own)}) or ({' + '.join(fallback)} {starts.unless_own()})"
    return f"({runs}) and ({value} == {value}) or {value} * 1"


def level_code_mappings(catalog: Catalog, spec: MetricSpec) -> list[Json]:
    """Value mappings from level_code_query()'s index to the level's label in its colour."""
    options = {
        str(i): {"color": catalog.colour(level.status), "index": i, "text": level.label}
        for i, level in enumerate(spec.levels)
    }
    return [{"type": "value", "options": options}]


def trend_codes(trend: Trend) -> dict[int, tuple[str, str]]:
    """Code -> (arrow, colour status) for the head-trend query: stable, then up/down per context."""
    codes = {TREND_STABLE: (trend.arrows["stable"], trend.stable_colour)}
    for i, ctx in enumerate(trend.context):
        codes[10 * (i + 1) + 1] = (trend.arrows["up"], ctx.up)
        codes[10 * (i + 1) + 2] = (trend.arrows["down"], ctx.down)
    return codes


def trend_mappings(catalog: Catalog, spec: MetricSpec) -> list[Json]:
    """Value mappings from the trend code to the TELE-321 arrow in its context colour."""
    if spec.trend is None:
        raise ValueError(f"{spec.id} has no trend rule")
    options = {
        str(code): {"color": catalog.colour(status), "index": i, "text": arrow}
        for i, (code, (arrow, status)) in enumerate(sorted(trend_codes(spec.trend).items()))
    }
    options[str(TREND_NONE)] = {
        "color": catalog.colour("neutral"),
        "index": len(options),
        "text": "no trend",
    }
    return [{"type": "value", "options": options}]


def nan_mapping(catalog: Catalog) -> Json:
    """NaN is data: shown as "NaN" in the critical colour, as the exporter's own display does."""
    return {
        "type": "special",
        "options": {"match": "nan", "result": {"color": catalog.colour("critical"), "text": "NaN"}},
    }


def with_nan(catalog: Catalog, mappings: list[Json]) -> list[Json]:
    """`mappings` plus the NaN mapping (an override's mappings replace the defaults', so each needs it)."""
    return [*mappings, nan_mapping(catalog)]


def flag_codes(ratio: MetricSpec) -> dict[str, int]:
    """Seed flag metric id -> the negative code the seed query returns for it, in TELE-557 priority.

    The higher level wins (exploding over vanishing): it comes first and gets the lowest code.
    """
    flagged = sorted((lv for lv in ratio.levels if lv.flag), key=lambda lv: lv.when.low, reverse=True)
    return {str(lv.flag): i - len(flagged) for i, lv in enumerate(flagged)}


SEED_LEVEL_CODE = -10
"""The seed query shows the ratio's level k (on its run's own levels) as SEED_LEVEL_CODE - k, below the flag codes."""


def seed_level_codes(ratio: MetricSpec) -> dict[int, int]:
    """Level index -> seed query code, for the levels with a fixed label; a "{value}" level shows the ratio itself."""
    return {k: SEED_LEVEL_CODE - k for k, lv in enumerate(ratio.levels) if "{value}" not in lv.label}


def seed_query(ratio: MetricSpec, raised: list[str], value: str, code: str) -> str:
    """PromQL for TELE-557's display: the first raised flag's code, else the ratio's level code, else the ratio.

    `raised` are the flag terms in priority order, `code` level_code_query() of `value`. The
    "{value}" level (healthy) returns the ratio itself, every other level SEED_LEVEL_CODE - index
    (NaN stays NaN); `or` picks the first that exists per seed, with no arithmetic on the ratio.
    """
    (shown,) = [k for k, lv in enumerate(ratio.levels) if "{value}" in lv.label]
    return " or ".join([*raised, f"({value} and ({code}) == {shown})", f"{SEED_LEVEL_CODE} - ({code})"])


def seed_value_steps(catalog: Catalog, ratio: MetricSpec) -> list[Json]:
    """The seed query's plain numbers are ratios in the "{value}" level: that level's colour."""
    (level,) = [lv for lv in ratio.levels if "{value}" in lv.label]
    return [{"color": catalog.colour(level.status), "value": None}]


def seed_mappings(catalog: Catalog, ratio: MetricSpec) -> list[Json]:
    """TELE-557 display: a raised flag's code shows its level, and so does each fixed-label level's code.

    Levels whose label is fixed text ("OK", "▼ VANISHING", "▲ EXPLODING") come as codes, so +Inf
    shows "▲ EXPLODING" even where no flag says so; "ratio={value}" stays a number.
    """
    by_flag = {lv.flag: lv for lv in ratio.levels if lv.flag}
    shown = [(code, by_flag[flag]) for flag, code in flag_codes(ratio).items()]
    shown += [(code, ratio.levels[k]) for k, code in seed_level_codes(ratio).items()]
    codes = {
        str(code): {"color": catalog.colour(lv.status), "index": i, "text": lv.label}
        for i, (code, lv) in enumerate(sorted(shown, key=lambda item: -item[0]))
    }
    return with_nan(catalog, [{"type": "value", "options": codes}])


def trend_query(current: str, prev: str, trend: Trend) -> str:
    """PromQL returning the trend code per head: 1 stable, 10*(context+1)+1 up, +2 down.

    0 ("no trend") where either value is NaN or infinite, as display.head_trend reads it:
    the code is kept only where the delta is finite, and `or` fills in 0 for the rest.
    """
    delta = f"({current} - {prev})"
    stable = trend.stable
    # Above the stable interval is past its high end (not <= / <), below it past its low end.
    up = f"({delta} {comparison(low_op(not stable.high_closed), True)} {number(stable.high)})"
    down = f"({delta} {comparison(high_op(not stable.low_closed), True)} {number(stable.low)})"
    up_terms = " + ".join(f"{10 * (i + 1) + 1} * {indicator(current, ctx.when)}" for i, ctx in enumerate(trend.context))
    down_terms = " + ".join(
        f"{10 * (i + 1) + 2} * {indicator(current, ctx.when)}" for i, ctx in enumerate(trend.context)
    )
    code = f"{TREND_STABLE} * {indicator(delta, stable)} + {up} * ({up_terms}) + {down} * ({down_terms})"
    return f"({code}) and (abs{delta} < {number(math.inf)}) or {TREND_NONE} * ({current} >= bool {number(-math.inf)})"


def neutral_steps(catalog: Catalog) -> list[Json]:
    return [{"color": catalog.colour("neutral"), "value": None}]


def count_steps(catalog: Catalog) -> list[Json]:
    """Counts of bad events: 0 is ok, any at all is critical."""
    return [
        {"color": catalog.colour("ok"), "value": None},
        {"color": catalog.colour("critical"), "value": 1},
    ]


def healthy_unit(ratio: MetricSpec) -> str:
    """Grafana custom unit drawing the healthy label: "ratio={value}" gives "prefix:ratio="."""
    prefix, _, suffix = ratio.level("healthy").label.partition("{value}")
    if prefix and not suffix:
        return f"prefix:{prefix}"
    if suffix and not prefix:
        return f"suffix:{suffix}"
    return grafana_unit(ratio)


def flag_steps(catalog: Catalog, ratio: MetricSpec, flag: MetricSpec) -> list[Json]:
    """A 0/1 flag column: 0 is ok, 1 in the colour of the level it flags (TELE-557: vanishing yellow)."""
    level = next(lv for lv in ratio.levels if lv.flag == flag.id)
    return [{"color": catalog.colour("ok"), "value": None}, {"color": catalog.colour(level.status), "value": 1}]


def stale_steps(catalog: Catalog, spec: MetricSpec) -> list[Json]:
    """Seconds since the last update: ok, then critical once older than the stale alert's `after`."""
    stale = next(a for a in spec.alerts if a.kind == "stale")
    assert stale.after is not None
    limit = math.nextafter(duration_seconds(stale.after), math.inf)
    return [{"color": catalog.colour("ok"), "value": None}, {"color": catalog.colour(stale.severity), "value": limit}]


def grafana_unit(spec: MetricSpec) -> str:
    """Grafana unit: seconds for *_seconds metrics, else a plain number ("none")."""
    return {"seconds": "s"}.get(spec.unit, "none")
