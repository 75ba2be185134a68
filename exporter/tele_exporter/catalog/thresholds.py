"""Per-run thresholds: a run moves the boundaries of catalog levels without touching the catalog.

A run names, per signal (catalog id), the value at which a level starts, e.g.
{"policy_grad_norm": {"warning": 50, "critical": 100}}. Whether that start is
inclusive ("[") or exclusive ("(") stays as the catalog says, so every alert and
colour keeps its boundary semantics. The result is a Catalog of the run's own,
which the snapshot, the live page and the exported `tele_threshold` series use.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import safe_yaml
from .model import Catalog, Interval, Level, MetricSpec

THRESHOLDS_ENV = "TELE_EXPORTER_THRESHOLDS"
"""Environment variable naming a thresholds file, read when Telemetry gets no thresholds_file."""

THRESHOLD_METRIC = "threshold"
"""Catalog id of the gauge that exports each run's level starts (tele_threshold{metric, level})."""

Thresholds = Mapping[str, Mapping[str, float]]


class ThresholdsError(ValueError):
    """Per-run thresholds that cannot apply to the catalog; the message names the culprit."""


def movable(spec: MetricSpec) -> tuple[Level, ...]:
    """The levels whose start a run may set: all but those starting at 0 (the first, and TELE-557's 'no data')."""
    return tuple(level for level in spec.levels if level.when.low > 0)


def signals(catalog: Catalog) -> tuple[MetricSpec, ...]:
    """The catalog metrics with levels a run may move (and whose starts are exported)."""
    return tuple(spec for spec in catalog if spec.type != "histogram" and movable(spec))


def load_thresholds(path: str | Path) -> dict[str, dict[str, float]]:
    """Read a thresholds file: a YAML mapping of signal -> level -> start value."""
    file = Path(path)
    return _as_mapping(str(file), safe_yaml.load_file(file, ThresholdsError, "the thresholds file"))


def resolve(
    catalog: Catalog, thresholds: Thresholds | None = None, thresholds_file: str | Path | None = None
) -> Catalog:
    """The run's catalog: the file's levels (or $TELE_EXPORTER_THRESHOLDS'), then `thresholds` over them."""
    path = thresholds_file if thresholds_file is not None else os.environ.get(THRESHOLDS_ENV, "").strip() or None
    if path is not None:
        catalog = apply(catalog, load_thresholds(path), str(path))
    if thresholds is not None:
        catalog = apply(catalog, _as_mapping("thresholds", thresholds), "thresholds")
    return catalog


def apply(catalog: Catalog, thresholds: Thresholds, source: str = "thresholds") -> Catalog:
    """A copy of `catalog` whose levels start where `thresholds` says; raises ThresholdsError naming the culprit."""
    metrics = dict(catalog.metrics)
    for signal, levels in _as_mapping(source, thresholds).items():
        spec = metrics.get(signal)
        where = f"{source}: {signal}"
        if spec is None or spec.type == "histogram" or not spec.levels:
            known = ", ".join(s.id for s in signals(catalog))
            raise ThresholdsError(f"{where}: not a catalog signal with levels (signals: {known})")
        metrics[signal] = _moved(spec, levels, where)
    return replace(catalog, metrics=metrics)


def _moved(spec: MetricSpec, starts: Mapping[str, float], where: str) -> MetricSpec:
    names = [level.name for level in spec.levels]
    allowed = [level.name for level in movable(spec)]
    for name, value in starts.items():
        if name not in names:
            raise ThresholdsError(f"{where}.{name}: no such level (levels that can move: {', '.join(allowed)})")
        if name not in allowed:
            raise ThresholdsError(f"{where}.{name}: the level starts at 0 and cannot move (can: {', '.join(allowed)})")
        if not math.isfinite(value):
            raise ThresholdsError(f"{where}.{name}: {value} is not a finite number")
    lows = [starts.get(level.name, level.when.low) for level in spec.levels]
    for i in range(1, len(lows)):
        if lows[i] <= lows[i - 1] and spec.levels[i].name in allowed:
            before, name = spec.levels[i - 1].name, spec.levels[i].name
            given = "" if name in starts else f" (the catalog's; set {name!r} too)"
            raise ThresholdsError(
                f"{where}.{name}: starts at {lows[i]}{given}, not above {before!r} at {lows[i - 1]}; "
                f"levels go upward in the catalog's order ({', '.join(names)})"
            )
    levels = []
    for i, level in enumerate(spec.levels):
        iv = level.when
        high = lows[i + 1] if i + 1 < len(lows) else iv.high
        levels.append(replace(level, when=Interval(lows[i], iv.low_closed, high, iv.high_closed)))
    return replace(spec, levels=tuple(levels))


def _as_mapping(source: str, raw: Any) -> dict[str, dict[str, float]]:
    """Check the shape signal -> level -> number, naming the first entry that is not."""
    if not isinstance(raw, Mapping):
        raise ThresholdsError(f"{source}: expected a mapping of signal -> level -> value, got {type(raw).__name__}")
    out: dict[str, dict[str, float]] = {}
    for signal, levels in raw.items():
        if not isinstance(signal, str):
            raise ThresholdsError(f"{source}: signal {signal!r} is not a string")
        if not isinstance(levels, Mapping):
            raise ThresholdsError(f"{source}: {signal}: expected a mapping of level -> value, got {levels!r}")
        out[signal] = {}
        for level, value in levels.items():
            if not isinstance(level, str):
                raise ThresholdsError(f"{source}: {signal}: level {level!r} is not a string")
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's numbers too
                raise ThresholdsError(f"{source}: {signal}.{level}: {value!r} is not a number")
            out[signal][level] = float(value)
    return out


def exported(catalog: Catalog) -> list[tuple[str, str, float]]:
    """(metric name, level, start) of every movable level: the run's `tele_threshold` samples."""
    return [(spec.name, level.name, level.when.low) for spec in signals(catalog) for level in movable(spec)]
