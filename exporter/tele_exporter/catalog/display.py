"""Display rules of the TELE records, driven by the catalog: levels, trend arrows, colours.

Pure functions of values and catalog specs, shared by the snapshot, the JSON API
and anything that renders telemetry for a person.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .model import MetricSpec


@dataclass(frozen=True)
class Shown:
    """How a value is shown: its level (None when it has none), label and colour status."""

    level: str | None
    label: str
    status: str  # ok | warning | critical | neutral


def show(spec: MetricSpec, value: float | None) -> Shown:
    """The level a value falls in and its label; None (missing) shows as missing, NaN as critical."""
    if value is None:
        return Shown(None, "missing", "neutral")
    if math.isnan(value):
        return Shown(None, "NaN", "critical")
    level = spec.level_of(value)
    if level is None:
        return Shown(None, f"{value:.{spec.precision}f}", "neutral")
    return Shown(level.name, level.render(value, spec.precision), level.status)


@dataclass(frozen=True)
class Arrow:
    """A trend arrow and the colour status it is drawn in."""

    arrow: str
    status: str


def head_trend(spec: MetricSpec, current: float, prev: float) -> Arrow | None:
    """TELE-321: arrow from delta = current - prev, coloured by where current lies.

    None when either value is missing or not finite: no trend can be read.
    """
    trend = spec.trend
    if trend is None:
        raise ValueError(f"{spec.id} has no trend rule in the catalog")
    if not (math.isfinite(current) and math.isfinite(prev)):
        return None
    delta = current - prev
    if trend.stable.contains(delta):
        return Arrow(trend.arrows["stable"], trend.stable_colour)
    direction = "up" if delta > 0 else "down"
    for ctx in trend.context:
        if ctx.when.contains(current):
            return Arrow(trend.arrows[direction], getattr(ctx, direction))
    return Arrow(trend.arrows[direction], "neutral")


HISTORY_ARROWS = {"up": "↑", "down": "↓", "stable": "→"}


def history_trend(spec: MetricSpec, values: Sequence[float]) -> Arrow | None:
    """Trend of a history (TELE-311/111): the newest value against the one before it.

    Stable when they differ by at most the catalog's `history_stable` fraction of
    the larger; the arrow is coloured by the newest value's level.
    """
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return None
    prev, last = finite[-2], finite[-1]
    status = show(spec, last).status
    if abs(last - prev) <= spec.history_stable * max(abs(prev), abs(last)):
        return Arrow(HISTORY_ARROWS["stable"], status)
    return Arrow(HISTORY_ARROWS["up" if last > prev else "down"], status)


def sparkline(values: Sequence[float]) -> str:
    """A unicode sparkline of finite values (TELE-311/111 histories); gaps for NaN/Inf."""
    bars = "▁▂▃▄▅▆▇█"
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return " " * len(values)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(" ")
        elif span == 0:
            out.append(bars[0])
        else:
            out.append(bars[min(len(bars) - 1, int((v - lo) / span * (len(bars) - 1) + 0.5))])
    return "".join(out)
