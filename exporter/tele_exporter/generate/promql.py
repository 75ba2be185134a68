"""PromQL building blocks for the rule files and the dashboard: number literals, selectors, level starts.

One writer for each, so an alert rule and a dashboard panel compare a value with its run's level start alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..catalog.model import Interval, MetricSpec
from ..catalog.thresholds import movable


def number(value: float) -> str:
    """A PromQL number literal that parses back to exactly `value`: 0.015, 1e-08, 5, +Inf, NaN."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)).removesuffix(".0")


def bucket_bound(value: float) -> str:
    """A histogram bucket's `le` label value as prometheus_client writes it: "10.0", "0.015", "+Inf".

    A label to match, not a number: 10.0 must stay "10.0", so this is not number().
    """
    return "+Inf" if value == math.inf else repr(float(value))


def matcher(label: str, value: str, op: str = "=") -> str:
    """One label matcher, `label op "value"`, the value quoted as a PromQL string."""
    return f"{label}{op}{json.dumps(value, ensure_ascii=False)}"


def selector(name: str, labels: Mapping[str, str] | None = None, *, matchers: Sequence[str] = ()) -> str:
    """`name{matchers, label="value", ...}`, or the bare name when there is no matcher at all.

    `matchers` come first as written (the catalog's selector, regex matchers), then `labels`
    as equality matchers in the mapping's order.
    """
    parts = [*matchers, *(matcher(label, value) for label, value in (labels or {}).items())]
    return f"{name}{{{', '.join(parts)}}}" if parts else name


def threshold_labels(metric: str, level: str | None = None) -> dict[str, str]:
    """The labels of the `tele_threshold` series that say where `metric`'s `level` starts (all its levels: None)."""
    return {"metric": metric} if level is None else {"metric": metric, "level": level}


def threshold_selector(name: str, metric: str, level: str | None = None, *, matchers: Sequence[str] = ()) -> str:
    """The `tele_threshold` selector (metric `name`) of `metric`'s `level`, or of all its levels when None."""
    return selector(name, threshold_labels(metric, level), matchers=matchers)


def ignoring(labels: Iterable[str]) -> str:
    """The vector-matching clause `ignoring (a, b)`."""
    return f"ignoring ({', '.join(labels)})"


def low_op(closed: bool) -> str:
    """The comparison keeping values above a lower bound: ">=" when it is closed, ">" when open."""
    return ">=" if closed else ">"


def high_op(closed: bool) -> str:
    """The comparison keeping values below an upper bound: "<=" when it is closed, "<" when open."""
    return "<=" if closed else "<"


def comparison(op: str, boolean: bool = False) -> str:
    """`op`, with the `bool` modifier when the comparison should return 0/1 instead of filtering."""
    return f"{op} bool" if boolean else op


def interval_filter(interval: Interval) -> str:
    """Comparison filters keeping exactly the samples in `interval`.

    "(5.0, 10.0]" becomes "> 5 <= 10". NaN passes no comparison, so a NaN sample
    is in no interval. "+inf]" needs no upper filter (+Inf <= +Inf), "+inf)"
    excludes +Inf with "< +Inf".
    """
    parts = []
    if interval.low != -math.inf or not interval.low_closed:
        parts.append(f"{low_op(interval.low_closed)} {number(interval.low)}")
    if interval.high != math.inf or not interval.high_closed:
        parts.append(f"{high_op(interval.high_closed)} {number(interval.high)}")
    return " ".join(parts)


def indicator(expr: str, interval: Interval) -> str:
    """1 where `expr` lies in `interval` (both ends exact), else 0; NaN stays out of every interval."""
    parts = []
    if math.isfinite(interval.low):
        parts.append(f"({expr} {comparison(low_op(interval.low_closed), True)} {number(interval.low)})")
    if math.isfinite(interval.high):
        parts.append(f"({expr} {comparison(high_op(interval.high_closed), True)} {number(interval.high)})")
    return " * ".join(parts) if parts else f"({expr} {comparison('>=', True)} {number(-math.inf)})"


@dataclass(frozen=True)
class RunStarts:
    """Where one metric's levels start for each run: the `tele_threshold` series it exports, else the catalog's.

    `threshold(level)` is the run's tele_threshold selector of one level (None: of all the metric's
    levels); `at` a modifier such as " @ end()" written after each of them.
    """

    spec: MetricSpec
    threshold: Callable[[str | None], str]
    at: str = ""

    @property
    def ignoring(self) -> str:
        """A series meets its run's tele_threshold on every label but its own, `metric` and `level`."""
        return ignoring([*self.spec.labels, "metric", "level"])

    @property
    def movable(self) -> frozenset[str]:
        """The levels whose start a run may set, and so exports."""
        return frozenset(level.name for level in movable(self.spec))

    def compare(self, op: str, level: str, constant: float, *, boolean: bool = False, sep: str = " ") -> str:
        """`op start`: the run's tele_threshold of `level` where a run may move it, else the catalog's `constant`.

        A run's start is matched `ignoring ... group_left`, `sep` before its selector. A run that
        exports no tele_threshold at all falls back through unless_own().
        """
        if level in self.movable:
            return f"{comparison(op, boolean)} {self.ignoring} group_left{sep}{self.threshold(level)}{self.at}"
        return f"{comparison(op, boolean)} {number(constant)}"

    def unless_own(self, sep: str = " ") -> str:
        """`unless` the run exports a tele_threshold for the metric: the catalog's constants hold only for the rest."""
        return f"unless {self.ignoring}{sep}{self.threshold(None)}{self.at}"
