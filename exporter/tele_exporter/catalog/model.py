"""Load and validate the TELE catalog (catalog.yaml), the single source of truth.

Every metric name, threshold, display rule and alert comes from here; a malformed
catalog fails on load with an error naming the entry and the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from . import safe_yaml
from .labels import RESERVED_LABELS as RESERVED_LABELS
from .labels import check_label_names

DEFAULT_PATH = Path(__file__).with_name("catalog.yaml")

METRIC_TYPES = ("gauge", "counter", "histogram")
STATUSES = ("ok", "warning", "critical")
COLOUR_KEYS = (*STATUSES, "neutral")
# A level may also be neutral: shown dim, never alerted on (TELE-121's "slow decline").
LEVEL_STATUSES = COLOUR_KEYS
SEVERITIES = ("warning", "critical")
ALERT_KINDS = ("stale", "increase", "errors", "ranks_missing", "rank_lag", "spike", "drop", "fall", "trend")
# Alerts against the run's own recent past: spike (above factor x its median), drop (below median / factor),
# fall (below median - by), and trend (predict_linear crossing the metric's `toward` level within `horizon`).
RELATIVE_KINDS = ("spike", "drop", "fall", "trend")
SCALES = ("records", "run")
# Aggregations of a metric across the ranks of a job (prometheus/rules/tele-ranks.yml):
# "worst" is min and/or max as the levels go bad; the *_rate ones are of a counter's rate.
RANK_OPS = ("worst", "max", "min", "avg", "sum_rate", "min_rate")
_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_ALERT_RE = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_DURATION_RE = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_SELECTOR_RE = re.compile(
    r'^\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"'
    r'(\s*,\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*")*\s*$'
)
_INTERVAL_RE = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*$")
_DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class CatalogError(ValueError):
    """The catalog is missing or malformed; the message names the entry and field."""


class MissingMetricError(CatalogError, KeyError):
    """A metric tele-exporter needs is not in the catalog; the message names it."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Interval:
    """A real interval with explicit open or closed ends, written "[a, b)" etc."""

    low: float
    low_closed: bool
    high: float
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        match = _INTERVAL_RE.match(text)
        if match is None:
            raise ValueError(f"{text!r} is not an interval like '[0.1, 5.0]' or '(10, +inf)'")
        left, low_s, high_s, right = match.groups()
        low, high = float(low_s), float(high_s)
        if math.isnan(low) or math.isnan(high) or low > high:
            raise ValueError(f"{text!r} has bounds out of order")
        interval = cls(low, left == "[", high, right == "]")
        if low == math.inf or high == -math.inf:
            raise ValueError(f"{text!r} has bounds out of order")
        if low == high and not (interval.low_closed and interval.high_closed):
            raise ValueError(f"{text!r} is empty")
        return interval

    def contains(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def edges(self) -> tuple[float, ...]:
        """The finite bounds, which are the thresholds this interval encodes."""
        return tuple(v for v in (self.low, self.high) if math.isfinite(v))

    def __str__(self) -> str:
        def fmt(v: float) -> str:
            return "+inf" if v == math.inf else "-inf" if v == -math.inf else repr(v)

        left = "[" if self.low_closed else "("
        right = "]" if self.high_closed else ")"
        return f"{left}{fmt(self.low)}, {fmt(self.high)}{right}"


@dataclass(frozen=True)
class LevelAlert:
    """An alert that fires while the metric stays in a level for `for_`."""

    name: str
    severity: str
    for_: str


@dataclass(frozen=True)
class Level:
    """One health level of a metric: the values it covers and how it is shown."""

    name: str
    when: Interval
    status: str
    label: str
    flag: str | None = None
    alert: LevelAlert | None = None

    def render(self, value: float, precision: int) -> str:
        """The level's display label; "{value}" is replaced by the value."""
        return self.label.replace("{value}", f"{value:.{precision}f}")


@dataclass(frozen=True)
class MetricAlert:
    """An alert on a metric that is not a level: staleness or any increase."""

    name: str
    kind: str
    severity: str
    for_: str
    after: str | None = None
    window: str | None = None
    # rank_lag: how many update intervals a rank may trail the freshest rank of its job.
    intervals: float | None = None
    # spike/drop: the factor against the baseline; fall: the amount below it; trend: how far ahead to look.
    factor: float | None = None
    by: float | None = None
    horizon: str | None = None
    toward: str | None = None  # trend: the level whose start the prediction must reach
    # Which runs the alert pages: "run" (runs that page against their own baseline), "records" (runs on
    # the records' scale, or that say nothing of it), or None (every run).
    scale: str | None = None


@dataclass(frozen=True)
class TrendContext:
    """Arrow colours (as statuses) for a trend while the current value lies in `when`."""

    when: Interval
    up: str
    down: str


@dataclass(frozen=True)
class Trend:
    """TELE-321 trend rule: delta inside `stable` is no trend, else up/down in context."""

    stable: Interval
    arrows: Mapping[str, str]
    stable_colour: str
    context: tuple[TrendContext, ...]


@dataclass(frozen=True)
class MetricSpec:
    """One catalog entry."""

    id: str
    name: str
    type: str
    labels: tuple[str, ...]
    tele: tuple[str, ...]
    unit: str
    help: str
    question: str
    precision: int
    history: int = 0
    history_stable: float = 0.0
    levels: tuple[Level, ...] = ()
    trend: Trend | None = None
    alert_on: Mapping[str, str] = field(default_factory=dict)
    early_stop_factor: float | None = None
    alerts: tuple[MetricAlert, ...] = ()
    of: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    ranks: tuple[str, ...] = ()
    # "records": the level alerts page only on runs that keep the TELE records' scale (or say nothing of it);
    # a run that pages against its own baseline (tele_alert_scale_info{scale="run"}) uses `alerts` instead.
    scale: str | None = None

    @property
    def family_name(self) -> str:
        """The name prometheus_client families take (counters without `_total`)."""
        return self.name.removesuffix("_total") if self.type == "counter" else self.name

    def level_of(self, value: float) -> Level | None:
        """The level whose interval holds `value`; None for NaN or a metric without levels."""
        for level in self.levels:
            if level.when.contains(value):
                return level
        return None

    def level(self, name: str) -> Level:
        for level in self.levels:
            if level.name == name:
                return level
        raise KeyError(f"{self.id} has no level {name!r}")

    def bad_sides(self) -> tuple[str, ...]:
        """Which way the value goes bad, as the aggregation that finds its worst: "min", "max" or both."""
        return bad_sides(self.levels)

    def thresholds(self) -> tuple[float, ...]:
        """Every finite boundary of the levels and trend contexts, sorted."""
        edges: set[float] = set()
        for level in self.levels:
            edges.update(level.when.edges())
        if self.trend is not None:
            for ctx in self.trend.context:
                edges.update(ctx.when.edges())
        return tuple(sorted(edges))


def bad_sides(levels: Sequence[Level]) -> tuple[str, ...]:
    """ "min" when a warning or critical level lies below the ok levels, "max" when one lies above them."""
    ok = [i for i, level in enumerate(levels) if level.status == "ok"]
    bad = [level.status in SEVERITIES for level in levels]
    if not ok:
        return ()
    return (*(("min",) if any(bad[: ok[0]]) else ()), *(("max",) if any(bad[ok[-1] + 1 :]) else ()))


@dataclass(frozen=True)
class Catalog:
    """The whole catalog: namespace, colours, metric specs by id and the rules' selector."""

    namespace: str
    colours: Mapping[str, str]
    metrics: Mapping[str, MetricSpec]
    path: Path
    # PromQL label matchers (without braces) for the trainer's series; "" selects all.
    selector: str = ""
    runbook: str = ""
    # The label that tells training jobs apart in the rank rules ("" groups by job alone).
    job_label: str = ""

    def __getitem__(self, metric_id: str) -> MetricSpec:
        try:
            return self.metrics[metric_id]
        except KeyError:
            raise MissingMetricError(
                f"{self.path}: metrics.{metric_id}: is required by tele-exporter but missing from the catalog"
            ) from None

    def __iter__(self) -> Any:
        return iter(self.metrics.values())

    def colour(self, status: str) -> str:
        return self.colours[status]


def duration_seconds(text: str) -> float:
    """Seconds in a Prometheus duration such as '5m'."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m or 1h")
    return int(match.group(1)) * _DURATION_SECONDS[match.group(2)]


class _Reader:
    """Reads one mapping of the YAML tree, naming `where` in every error."""

    def __init__(self, path: Path, where: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise CatalogError(f"{path}: {where}: expected a mapping, got {type(data).__name__}")
        self.path, self.where, self.data = path, where, data

    def fail(self, key: str, problem: str) -> CatalogError:
        return CatalogError(f"{self.path}: {self.where}.{key}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise self.fail(key, "is required")
            return default
        value = self.data[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(key, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(key, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def choice(self, key: str, choices: Sequence[str], default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.fail(key, f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    def interval(self, key: str) -> Interval:
        try:
            return Interval.parse(self.get(key, str))
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def duration(self, key: str, default: Any = ...) -> str:
        value = self.get(key, str, default)
        try:
            duration_seconds(value)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None
        return str(value)

    def child(self, key: str, data: Any) -> _Reader:
        return _Reader(self.path, f"{self.where}.{key}", data)

    def check_keys(self, allowed: Sequence[str]) -> None:
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            raise self.fail(unknown[0], f"unknown field (allowed: {', '.join(allowed)})")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names: dict[type, str] = {dict: "a mapping", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


_METRIC_KEYS = (
    "scale",
    "name",
    "type",
    "labels",
    "tele",
    "unit",
    "help",
    "question",
    "precision",
    "history",
    "history_stable",
    "levels",
    "trend",
    "alert_on",
    "early_stop_factor",
    "alerts",
    "of",
    "buckets",
    "ranks",
)


def _read_levels(r: _Reader) -> tuple[Level, ...]:
    levels = []
    for i, raw in enumerate(r.get("levels", list, [])):
        lr = r.child(f"levels[{i}]", raw)
        lr.check_keys(("name", "when", "status", "label", "flag", "alert"))
        alert = None
        if "alert" in lr.data:
            ar = lr.child("alert", lr.data["alert"])
            ar.check_keys(("name", "severity", "for"))
            alert_name = ar.get("name", str)
            if not _ALERT_RE.match(alert_name):
                raise ar.fail("name", f"{alert_name!r} is not an alert name in UpperCamelCase")
            alert = LevelAlert(alert_name, ar.choice("severity", SEVERITIES), ar.duration("for"))
        levels.append(
            Level(
                name=lr.get("name", str),
                when=lr.interval("when"),
                status=lr.choice("status", LEVEL_STATUSES),
                label=lr.get("label", str),
                flag=lr.get("flag", str, None),
                alert=alert,
            )
        )
    _check_partition(r, "levels", [(lv.name, lv.when) for lv in levels])
    return tuple(levels)


def _check_partition(r: _Reader, key: str, parts: list[tuple[str, Interval]]) -> None:
    """Intervals must cover [0, +inf], or [-inf, +inf] for a signed metric, exactly once, in ascending order.

    A signed metric's first level starts at "[-inf" (explained variance, entropy velocity): -Inf is data too.
    """
    if not parts:
        return
    signed = parts[0][1].low == -math.inf
    if signed and not parts[0][1].low_closed:
        raise r.fail(key, f"level {parts[0][0]!r} {parts[0][1]} must start at [-inf to cover -Inf")
    cursor, cursor_covered = (-math.inf, False) if signed else (0.0, False)  # everything below `cursor` is covered
    for name, iv in parts:
        if iv.low != cursor or iv.low_closed == cursor_covered:
            problem = (
                "overlaps the level before it"
                if cursor_covered and iv.low_closed
                else ("leaves a gap before it" if iv.low >= cursor else "overlaps the level before it")
            )
            raise r.fail(key, f"level {name!r} {iv} {problem}; levels must partition [0, +inf] or [-inf, +inf]")
        cursor, cursor_covered = iv.high, iv.high_closed
    if cursor != math.inf or not cursor_covered:
        raise r.fail(key, f"levels end at {cursor}; the last must close at +inf] to cover Inf")


def _read_trend(r: _Reader) -> Trend | None:
    if "trend" not in r.data:
        return None
    tr = r.child("trend", r.data["trend"])
    tr.check_keys(("stable", "arrows", "stable_colour", "context"))
    arrows = tr.get("arrows", dict)
    for key in ("stable", "up", "down"):
        if not isinstance(arrows.get(key), str):
            raise tr.fail("arrows", f"needs a string for {key!r}")
    contexts = []
    for i, raw in enumerate(tr.get("context", list)):
        cr = tr.child(f"context[{i}]", raw)
        cr.check_keys(("when", "up", "down"))
        contexts.append(TrendContext(cr.interval("when"), cr.choice("up", COLOUR_KEYS), cr.choice("down", COLOUR_KEYS)))
    _check_partition(tr, "context", [(f"context[{i}]", c.when) for i, c in enumerate(contexts)])
    return Trend(tr.interval("stable"), dict(arrows), tr.choice("stable_colour", COLOUR_KEYS), tuple(contexts))


_ALERT_KEYS: tuple[str, ...] = ("name", "kind", "severity", "for", "after", "window", "intervals", "factor", "by")
_ALERT_KEYS += ("horizon", "toward", "scale")


def _read_alerts(r: _Reader) -> tuple[MetricAlert, ...]:
    alerts = []
    for i, raw in enumerate(r.get("alerts", list, [])):
        ar = r.child(f"alerts[{i}]", raw)
        ar.check_keys(
            (
                "name",
                "kind",
                "severity",
                "for",
                "after",
                "window",
                "intervals",
                "factor",
                "by",
                "horizon",
                "toward",
                "scale",
            )
        )
        kind = ar.choice("kind", ALERT_KINDS)
        intervals = None
        if kind == "rank_lag":
            intervals = float(ar.get("intervals", (int, float)))
            if not 0 < intervals < math.inf:
                raise ar.fail("intervals", f"must be a positive number of update intervals, got {intervals}")
        factor = by = None
        if kind in ("spike", "drop") or (kind == "trend" and "factor" in ar.data):
            factor = float(ar.get("factor", (int, float)))
            if not 1 < factor < math.inf:
                raise ar.fail("factor", f"must be a finite number > 1, got {factor}")
        if kind == "fall":
            by = float(ar.get("by", (int, float)))
            if not 0 < by < math.inf:
                raise ar.fail("by", f"must be a positive amount, got {by}")
        toward = ar.get("toward", str, None) if kind == "trend" else None
        if kind == "trend" and (toward is None) == (factor is None):
            raise ar.fail("toward", "a trend alert needs either `toward` (a level) or `factor` (against the baseline)")
        alerts.append(
            MetricAlert(
                name=ar.get("name", str),
                kind=kind,
                severity=ar.choice("severity", SEVERITIES),
                for_=ar.duration("for"),
                after=ar.duration("after") if kind == "stale" else None,
                window=ar.duration("window") if kind in ("increase", "errors", *RELATIVE_KINDS) else None,
                intervals=intervals,
                factor=factor,
                by=by,
                horizon=ar.duration("horizon") if kind == "trend" else None,
                toward=toward,
                scale=ar.choice("scale", SCALES) if "scale" in ar.data else None,
            )
        )
    return tuple(alerts)


def _read_ranks(r: _Reader, mtype: str, levels: tuple[Level, ...]) -> tuple[str, ...]:
    """The cross-rank aggregations: rates for counters, values for gauges; "worst" needs a side that goes bad."""
    ranks: list[str] = []
    for i, op in enumerate(r.get("ranks", list, [])):
        if op not in RANK_OPS:
            raise r.fail(f"ranks[{i}]", f"{op!r} is not one of {', '.join(RANK_OPS)}")
        if str(op).endswith("_rate") != (mtype == "counter"):
            raise r.fail(f"ranks[{i}]", f"{op!r} is not for a {mtype}")
        if op in ranks:
            raise r.fail(f"ranks[{i}]", f"{op!r} is given twice")
        ranks.append(str(op))
    if "worst" in ranks:
        ok = [i for i, level in enumerate(levels) if level.status == "ok"]
        between = [level.name for level in levels[ok[0] : ok[-1]] if level.status in SEVERITIES] if ok else []
        if between or not bad_sides(levels):
            where = f": level {between[0]!r} lies between ok levels" if between else ""
            raise r.fail("ranks", f"'worst' needs warning or critical levels below or above the ok levels{where}")
        again = [op for op in bad_sides(levels) if op in ranks]
        if again:
            raise r.fail("ranks", f"{again[0]!r} is what 'worst' gives for these levels: list it once")
    return tuple(ranks)


def _read_buckets(r: _Reader) -> tuple[float, ...]:
    buckets = []
    for i, edge in enumerate(r.get("buckets", list, [])):
        if isinstance(edge, bool) or not isinstance(edge, (int, float)):
            raise r.fail(f"buckets[{i}]", f"{edge!r} is not a number")
        buckets.append(float(edge))
    return tuple(buckets)


def _read_metric(path: Path, metric_id: str, raw: Any, namespace: str) -> MetricSpec:
    r = _Reader(path, f"metrics.{metric_id}", raw)
    r.check_keys(_METRIC_KEYS)
    name = r.get("name", str)
    if not _NAME_RE.match(name) or not name.startswith(f"{namespace}_"):
        raise r.fail("name", f"{name!r} must be a metric name starting with '{namespace}_'")
    mtype = r.choice("type", METRIC_TYPES)
    if mtype == "counter" and not name.endswith("_total"):
        raise r.fail("name", f"counter {name!r} must end in _total")
    if mtype != "counter" and name.endswith("_total"):
        raise r.fail("name", f"only counters end in _total, {name!r} is a {mtype}")
    labels = r.get("labels", list)
    try:
        check_label_names(labels)
    except ValueError as exc:
        raise r.fail("labels", str(exc)) from None
    unit = r.get("unit", str)
    if unit and not name.removesuffix("_total").endswith(f"_{unit}"):
        raise r.fail("unit", f"metric {name!r} must end in its unit _{unit}")
    precision = r.get("precision", int)
    if precision < 0:
        raise r.fail("precision", "must be >= 0")
    history = r.get("history", int, 0)
    if history < 0:
        raise r.fail("history", "must be >= 0")
    history_stable = float(r.get("history_stable", (int, float), 0.0))
    if not 0.0 <= history_stable < 1.0:
        raise r.fail("history_stable", "must be a fraction in [0, 1)")
    alert_on = r.get("alert_on", dict, {})
    for key in alert_on:
        if key not in labels:
            raise r.fail("alert_on", f"{key!r} is not one of the metric's labels")
    factor = r.get("early_stop_factor", (int, float), None)
    buckets = _read_buckets(r)
    if mtype == "histogram":
        if not buckets:
            raise r.fail("buckets", "a histogram needs buckets")
        if list(buckets) != sorted(set(buckets)):
            raise r.fail("buckets", "must be strictly increasing")
    elif buckets:
        raise r.fail("buckets", f"only histograms have buckets, {metric_id} is a {mtype}")
    levels = _read_levels(r)
    return MetricSpec(
        id=metric_id,
        name=name,
        type=mtype,
        labels=tuple(labels),
        tele=tuple(str(t) for t in r.get("tele", list)),
        unit=unit,
        help=r.get("help", str).strip(),
        question=r.get("question", str).strip(),
        precision=precision,
        history=history,
        history_stable=history_stable,
        levels=levels,
        trend=_read_trend(r),
        alert_on={str(k): str(v) for k, v in alert_on.items()},
        early_stop_factor=None if factor is None else float(factor),
        alerts=_read_alerts(r),
        of=tuple(str(o) for o in r.get("of", list, [])),
        buckets=buckets,
        ranks=_read_ranks(r, mtype, levels),
        scale=r.choice("scale", ("records",)) if "scale" in r.data else None,
    )


def _check_cross_references(path: Path, metrics: Mapping[str, MetricSpec]) -> None:
    alert_names: dict[str, tuple[str, str]] = {}
    for spec in metrics.values():
        where = f"{path}: metrics.{spec.id}"
        for ref in spec.of:
            if ref not in metrics:
                raise CatalogError(f"{where}.of: {ref!r} is not a metric id of the catalog")
            missing = [t for t in metrics[ref].thresholds() if t > 0 and t not in spec.buckets]
            if missing:
                raise CatalogError(f"{where}.buckets: thresholds {missing} of {ref} must be bucket edges")
        for alert in spec.alerts:
            if alert.toward is not None and alert.toward not in {lv.name for lv in spec.levels}:
                raise CatalogError(f"{where}.alerts: {alert.name} trends toward {alert.toward!r}, not a level")
        for level in spec.levels:
            if level.flag is not None and level.flag not in metrics:
                raise CatalogError(f"{where}.levels: flag {level.flag!r} is not a metric id")
        severities = [(lv.alert.name, lv.alert.severity) for lv in spec.levels if lv.alert]
        severities += [(a.name, a.severity) for a in spec.alerts]
        for name, severity in severities:
            owner = alert_names.get(f"{name}/{severity}")
            if owner is not None:
                raise CatalogError(f"{where}: alert {name} severity {severity} is already in {owner[0]}")
            alert_names[f"{name}/{severity}"] = (spec.id, severity)


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read and validate a catalog file; raises CatalogError naming what is wrong."""
    file = Path(path) if path is not None else DEFAULT_PATH
    raw = safe_yaml.load_file(file, CatalogError, "the catalog")
    top = _Reader(file, "catalog", raw)
    top.check_keys(("namespace", "selector", "job_label", "runbook", "colours", "metrics"))
    namespace = top.get("namespace", str)
    selector = top.get("selector", str, "")
    if selector and not _SELECTOR_RE.match(selector):
        raise top.fail("selector", f"{selector!r} is not a list of label matchers like 'job=\"tele\"'")
    colours = top.get("colours", dict)
    for key in COLOUR_KEYS:
        if not isinstance(colours.get(key), str):
            raise top.fail("colours", f"needs a colour for {key!r}")
    metrics = {
        str(mid): _read_metric(file, str(mid), entry, namespace) for mid, entry in top.get("metrics", dict).items()
    }
    names = [m.name for m in metrics.values()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise top.fail("metrics", f"metric name {dupes[0]!r} is used twice")
    _check_cross_references(file, metrics)
    runbook = top.get("runbook", str, "")
    if runbook and not runbook.startswith(("https://", "http://")):
        raise top.fail("runbook", f"{runbook!r} is not an http(s) URL")
    job_label = top.get("job_label", str, "")
    used = {label for spec in metrics.values() for label in spec.labels}
    taken = RESERVED_LABELS | used | {"rank", "node"}  # rank and node tell the ranks of one job apart
    if job_label and (not _NAME_RE.match(job_label) or job_label in taken):
        raise top.fail("job_label", f"{job_label!r} is not a label name, or is reserved, a rank label or a metric's")
    return Catalog(namespace, dict(colours), metrics, file, selector.strip(), runbook, job_label)


@cache
def default_catalog() -> Catalog:
    """The packaged catalog, loaded once."""
    return load_catalog()
