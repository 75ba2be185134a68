"""Grafana dashboard "TELE training health", generated from the catalog.

Every metric name, threshold, label, colour and question comes from the catalog,
so the colours a person sees in Grafana are the TELE records' levels.

Grafana colours a value with the last threshold step whose value is <= it
(steps are ">= value"), and a range value mapping matches from <= value <= to.
Catalog levels state each boundary as open or closed. A closed lower bound is a
Grafana step as it is; an open lower bound a (the level is "> a") becomes a step
at the next float64 above a, math.nextafter(a, +inf), which is exactly "> a"
for every double Grafana can hold. Range mappings use the same trick on open
ends, so thresholds and mappings reproduce the catalog at the boundary values.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..catalog import Catalog, Interval, Level, MetricSpec, Trend, duration_seconds

PATH = "grafana/dashboards/tele-training-health.json"
UID = "tele-training-health"
TITLE = "TELE training health"
TAGS = ["tele", "pytorch", "rl"]
SCHEMA_VERSION = 42
PROMETHEUS_UID = "tele-prometheus"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WIDTH = 24

Json = dict[str, Any]

# Codes the head-trend query returns; value mappings turn them into arrows.
TREND_NONE = 0
TREND_STABLE = 1


def files(catalog: Catalog) -> dict[str, str]:
    """The dashboard JSON file, deterministic (sorted keys, two-space indent)."""
    return {PATH: json.dumps(dashboard(catalog), indent=2, sort_keys=True, ensure_ascii=False) + "\n"}


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


def thresholds(steps: list[Json]) -> Json:
    return {"mode": "absolute", "steps": steps}


def range_mapping(catalog: Catalog, level: Level, text: str | None) -> Json:
    """A range value mapping covering exactly the level's interval, in its colour."""
    iv = level.when
    low = iv.low if iv.low_closed else math.nextafter(iv.low, math.inf)
    high: float | None = None
    if math.isfinite(iv.high):
        high = iv.high if iv.high_closed else math.nextafter(iv.high, -math.inf)
    result: Json = {"color": catalog.colour(level.status)}
    if text is not None:
        result["text"] = text
    return {"type": "range", "options": {"from": low, "to": high, "result": result}}


def level_mappings(catalog: Catalog, spec: MetricSpec) -> list[Json]:
    """Range mappings showing each level's label (TELE-330 "stable/warn/BAD")."""
    return [range_mapping(catalog, level, level.label) for level in spec.levels]


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


def seed_mappings(catalog: Catalog, ratio: MetricSpec) -> list[Json]:
    """TELE-557 display: a raised flag's code shows its level, and so does a ratio in a labelled level.

    Levels whose label is fixed text ("OK", "▼ VANISHING", "▲ EXPLODING") are range mappings,
    so +Inf shows "▲ EXPLODING" even where no flag says so; "ratio={value}" stays a number.
    """
    by_flag = {lv.flag: lv for lv in ratio.levels if lv.flag}
    codes = {
        str(code): {"color": catalog.colour(by_flag[flag].status), "index": i, "text": by_flag[flag].label}
        for i, (flag, code) in enumerate(sorted(flag_codes(ratio).items(), key=lambda kv: kv[1]))
    }
    ranges = [range_mapping(catalog, lv, lv.label) for lv in ratio.levels if "{value}" not in lv.label]
    return with_nan(catalog, [{"type": "value", "options": codes}, *ranges])


def _bool_cmp(expr: str, interval: Interval) -> str:
    """PromQL 1/0 indicator that `expr` lies in `interval` (exact open/closed ends)."""
    parts = []
    if math.isfinite(interval.low):
        parts.append(f"({expr} {'>=' if interval.low_closed else '>'} bool {interval.low!r})")
    if math.isfinite(interval.high):
        parts.append(f"({expr} {'<=' if interval.high_closed else '<'} bool {interval.high!r})")
    return " * ".join(parts) if parts else f"({expr} >= bool -Inf)"


def trend_query(current: str, prev: str, trend: Trend) -> str:
    """PromQL returning the trend code per head: 1 stable, 10*(context+1)+1 up, +2 down.

    0 ("no trend") where either value is NaN or infinite, as display.head_trend reads it:
    the code is kept only where the delta is finite, and `or` fills in 0 for the rest.
    """
    delta = f"({current} - {prev})"
    stable = trend.stable
    up = f"({delta} {'>' if stable.high_closed else '>='} bool {stable.high!r})"
    down = f"({delta} {'<' if stable.low_closed else '<='} bool {stable.low!r})"
    up_terms = " + ".join(f"{10 * (i + 1) + 1} * {_bool_cmp(current, ctx.when)}" for i, ctx in enumerate(trend.context))
    down_terms = " + ".join(
        f"{10 * (i + 1) + 2} * {_bool_cmp(current, ctx.when)}" for i, ctx in enumerate(trend.context)
    )
    code = f"{TREND_STABLE} * {_bool_cmp(delta, stable)} + {up} * ({up_terms}) + {down} * ({down_terms})"
    return f"({code}) and (abs{delta} < +Inf) or {TREND_NONE} * ({current} >= bool -Inf)"


class _Builder:
    """Lays panels out on the 24-column grid and numbers them."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.panels: list[Json] = []
        self.next_id = 1
        self.y = 0
        self.x = 0
        self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "collapsed": False,
                "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": self.y},
                "id": self._id(),
                "panels": [],
                "title": title,
                "type": "row",
            }
        )
        self.y += 1

    def add(self, panel: Json, w: int, h: int) -> None:
        if self.x + w > WIDTH:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        panel.setdefault("datasource", DATASOURCE)
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)

    def _newline(self) -> None:
        self.y += self.row_height
        self.x = 0
        self.row_height = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def _sel(spec: MetricSpec, *extra: str, env: bool = False, suffix: str = "") -> str:
    """The metric selected by the dashboard's job/instance (and env) variables."""
    matchers = ['job=~"$job"', 'instance=~"$instance"']
    if env:
        matchers.append('env=~"$env"')
    matchers.extend(extra)
    return f"{spec.name}{suffix}{{{', '.join(matchers)}}}"


def _target(expr: str, ref: str = "A", legend: str = "__auto", **extra: Any) -> Json:
    target: Json = {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        "refId": ref,
    }
    target.update(extra)
    return target


# Who a series comes from: the scrape target, and the rank under torchrun (DESIGN §9).
SOURCE_LABELS = ("job", "instance", "rank")
SOURCE_COLUMNS = {"instance": "Instance", "rank": "Rank"}
# Legends name the instance, and the rank where the series has one: label_replace adds
# " rank N" in a query-time label only when `rank` is set, so no stray word is shown without it.
RANK_TEXT = "rank_text"
LEGEND = "{{instance}}{{" + RANK_TEXT + "}}"


def _named(expr: str) -> str:
    """`expr` with the RANK_TEXT label the LEGEND needs."""
    return f'label_replace({expr}, "{RANK_TEXT}", " rank $1", "rank", "(.+)")'


def _merged_table(renames: dict[str, str]) -> list[dict[str, Any]]:
    """Merge instant queries into one table row per series, renamed and ordered as `renames`.

    Every target is aggregated `by` the same labels, so no frame carries `__name__` and
    `merge` finds equal label columns; `__name__` is dropped here too, for backends that keep it.
    """
    columns = {**SOURCE_COLUMNS, **renames}
    return [
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": {"Time": True, "__name__": True, "job": True},
                "indexByName": {name: i for i, name in enumerate(columns)},
                "renameByName": columns,
            },
        },
    ]


def _instant(expr: str, ref: str, labels: list[str]) -> Json:
    """A table target: one row per series of `labels` (and its source), without `__name__`."""
    by = ", ".join([*SOURCE_LABELS, *labels])
    return _target(f"max by ({by}) ({expr})", ref, "__auto", format="table", instant=True, range=False)


def _description(spec: MetricSpec, note: str = "") -> str:
    tele = ", ".join(spec.tele)
    source = f" ({tele}, `{spec.name}`)" if tele else f" (`{spec.name}`)"
    return spec.question + source + (f" {note}" if note else "")


def _boundary_note(spec: MetricSpec) -> str:
    """Plain words on how the exact catalog levels are drawn, for the panel description."""
    words = ", ".join(f"{lv.label.replace('{value}', 'value')} {lv.when}" for lv in spec.levels)
    opened = [lv.when.low for lv in spec.levels if not lv.when.low_closed]
    note = f"Levels from the catalog: {words}."
    if opened:
        bounds = ", ".join(repr(v) for v in opened)
        note += (
            f" Grafana colours a step from its value upward (>=); the steps after {bounds}"
            " sit at the next double above it, so a value of exactly the boundary keeps"
            " the lower level's colour as the catalog says."
        )
    return note


def _stat(
    spec: MetricSpec,
    title: str,
    expr: str,
    *,
    catalog: Catalog,
    graph: bool,
    mappings: list[Json] | None = None,
    steps: list[Json] | None = None,
    color_mode: str = "value",
    text_mode: str = "auto",
    note: str = "",
    description: str | None = None,
    decimals: int | None = None,
    unit: str | None = None,
) -> Json:
    return {
        "type": "stat",
        "title": title,
        "description": description if description is not None else _description(spec, note),
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "decimals": spec.precision if decimals is None else decimals,
                "mappings": with_nan(catalog, mappings or []),
                "thresholds": thresholds(steps if steps is not None else level_steps(catalog, spec)),
                "unit": _unit(spec) if unit is None else unit,
            },
            "overrides": [],
        },
        "options": {
            "colorMode": color_mode,
            "graphMode": "area" if graph else "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "percentChangeColorMode": "standard",
            "reduceOptions": {"calcs": ["last"], "fields": "", "values": False},
            "showPercentChange": False,
            "textMode": text_mode,
            "wideLayout": True,
        },
        "targets": [_target(_named(expr), legend=LEGEND)],
    }


def _timeseries(
    spec: MetricSpec,
    title: str,
    targets: list[Json],
    *,
    catalog: Catalog,
    steps: list[Json] | None = None,
    note: str = "",
) -> Json:
    return {
        "type": "timeseries",
        "title": title,
        "description": _description(spec, note),
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "palette-classic"},
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 2,
                    "fillOpacity": 0,
                    "showPoints": "auto",
                    "spanNulls": False,
                    "thresholdsStyle": {"mode": "line+area"},
                },
                "decimals": spec.precision,
                "mappings": with_nan(catalog, []),
                "min": 0,
                "thresholds": thresholds(steps if steps is not None else level_steps(catalog, spec)),
                "unit": _unit(spec),
            },
            "overrides": [],
        },
        "options": {
            "legend": {
                "calcs": ["last", "max"],
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "none"},
        },
        "targets": targets,
    }


def _unit(spec: MetricSpec) -> str:
    """Grafana unit: seconds for *_seconds metrics, else a plain number ("none")."""
    return {"seconds": "s"}.get(spec.unit, "none")


def _neutral(catalog: Catalog) -> list[Json]:
    return [{"color": catalog.colour("neutral"), "value": None}]


def _count_steps(catalog: Catalog) -> list[Json]:
    """Counts of bad events: 0 is ok, any at all is critical."""
    return [
        {"color": catalog.colour("ok"), "value": None},
        {"color": catalog.colour("critical"), "value": 1},
    ]


def _policy_row(b: _Builder) -> None:
    c = b.catalog
    kl, early, updates = c["kl_divergence"], c["ppo_early_stops"], c["ppo_updates"]
    b.row("Policy")
    b.add(_stat(kl, "KL divergence", _sel(kl), catalog=c, graph=True, note=_boundary_note(kl)), 6, 8)
    b.add(
        _timeseries(
            kl,
            "KL divergence over time",
            [_target(_named(_sel(kl)), legend=LEGEND)],
            catalog=c,
            note=_boundary_note(kl),
        ),
        12,
        8,
    )
    b.add(
        _stat(
            updates,
            "PPO updates in range",
            f"sum by (instance, rank) (increase({_sel(updates)}[$__range]))",
            catalog=c,
            graph=False,
            steps=_neutral(c),
        ),
        3,
        4,
    )
    b.add(
        _stat(
            early,
            "Early stops in range",
            f"sum by (instance, rank) (increase({_sel(early)}[$__range]))",
            catalog=c,
            graph=False,
            steps=_neutral(c),
        ),
        3,
        4,
    )


def _gradients_row(b: _Builder) -> None:
    c = b.catalog
    g, hist = c["policy_grad_norm"], c["step_policy_grad_norm"]
    alerted = ", ".join(f'{k}="{v}"' for k, v in g.alert_on.items())
    note = _boundary_note(g) + " Alerts watch the pre-clip norm; post-clip never exceeds max_norm."
    b.row("Gradients")
    for clip, word in (("pre", "pre-clip"), ("post", "post-clip")):
        b.add(
            _timeseries(
                g,
                f"Policy gradient norm, {word}",
                [_target(_named(_sel(g, f'clip="{clip}"')), legend=f"{LEGEND} {word}")],
                catalog=c,
                note=note,
            ),
            8,
            9,
        )
    b.add(
        {
            "type": "heatmap",
            "title": "Policy gradient norm per optimizer step (pre-clip)",
            "description": _description(hist),
            "fieldConfig": {
                "defaults": {
                    "custom": {"hideFrom": {"legend": False, "tooltip": False, "viz": False}},
                    "unit": _unit(hist),
                },
                "overrides": [],
            },
            "options": {
                "calculate": False,
                "exemplars": {"color": "rgba(255,0,255,0.7)"},
                "cellGap": 1,
                "color": {
                    "exponent": 0.5,
                    "fill": "dark-orange",
                    "mode": "scheme",
                    "reverse": False,
                    "scale": "exponential",
                    "scheme": "Oranges",
                    "steps": 64,
                },
                "filterValues": {"le": 1e-9},
                "legend": {"show": True},
                "rowsFrame": {"layout": "auto"},
                "showValue": "never",
                "tooltip": {"mode": "single", "showColorScale": False, "yHistogram": True},
                "yAxis": {"axisPlacement": "left", "reverse": False, "unit": _unit(hist)},
            },
            "targets": [
                _target(
                    f"sum by (le) (increase({_sel(hist, alerted, suffix='_bucket')}[$__rate_interval]))",
                    legend="{{le}}",
                    format="heatmap",
                )
            ],
        },
        8,
        9,
    )


COLOR_TEXT = {"type": "color-text"}


def _override(name: str, **properties: Any) -> Json:
    """A field override for the column called `name` (after the organize transformation)."""
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": key, "value": value} for key, value in properties.items()],
    }


def _table(
    spec: MetricSpec,
    title: str,
    columns: dict[str, tuple[str, Json]],
    *,
    catalog: Catalog,
    defaults: Json,
    description: str,
) -> Json:
    """One row per series of `spec.labels`: `columns` maps a header to (PromQL, its field overrides).

    Label columns are text as they are (unit "string": Grafana would read env "0" as a number);
    value columns colour their text, so NaN reads red and levels show their colours.
    """
    labels = {name: name.capitalize() for name in spec.labels}
    refs = {header: chr(ord("A") + i) for i, header in enumerate(columns)}
    renames = {**labels, **{f"Value #{refs[h]}": h for h in columns}}
    plain = {"unit": "string", "custom.cellOptions": {"type": "auto"}}
    return {
        "type": "table",
        "title": title,
        "description": description,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "custom": {"align": "auto", "inspect": False, "cellOptions": COLOR_TEXT},
                "mappings": with_nan(catalog, []),
                **defaults,
            },
            "overrides": [
                *(_override(name, **plain) for name in [*SOURCE_COLUMNS.values(), *labels.values()]),
                *(_override(header, **props) for header, (_, props) in columns.items() if props),
            ],
        },
        "options": {
            "cellHeight": "sm",
            "frameIndex": 0,
            "showHeader": True,
            "sortBy": [{"desc": False, "displayName": next(iter(labels.values()))}],
        },
        "targets": [_instant(expr, refs[header], list(spec.labels)) for header, (expr, _) in columns.items()],
        "transformations": _merged_table(renames),
    }


def _heads_row(b: _Builder) -> None:
    c = b.catalog
    cur, prev = c["head_grad_norm"], c["head_grad_norm_prev"]
    assert prev.trend is not None
    b.row("Action heads")
    code = trend_query(_sel(cur), _sel(prev), prev.trend)
    rules = "; ".join(f"current in {ctx.when}: up {ctx.up}, down {ctx.down}" for ctx in prev.trend.context)
    note = (
        f"delta = {cur.name} - {prev.name}; stable (→) while delta is in {prev.trend.stable}."
        f' Arrow colours by context: {rules}. "no trend": a head without gradient (NaN).'
    )
    trend = {"mappings": with_nan(c, trend_mappings(c, prev)), "decimals": 0}
    b.add(
        _table(
            cur,
            "Action heads: gradient norm and trend",
            {"Current": (_sel(cur), {}), "Previous": (_sel(prev), {}), "Trend": (code, trend)},
            catalog=c,
            defaults={"decimals": cur.precision, "thresholds": thresholds(_neutral(c)), "unit": _unit(cur)},
            description=_description(prev, note),
        ),
        24,
        9,
    )


def _cv_row(b: _Builder) -> None:
    c = b.catalog
    cv = c["gradient_cv"]
    note = _boundary_note(cv)
    b.row("Gradient CV")
    b.add(_stat(cv, "Gradient CV", _sel(cv), catalog=c, graph=True, note=note), 6, 8)
    b.add(
        _stat(
            cv,
            "Gradient CV status",
            _sel(cv),
            catalog=c,
            graph=False,
            mappings=level_mappings(c, cv),
            color_mode="background",
            note=note,
        ),
        6,
        8,
    )
    b.add(
        _timeseries(cv, "Gradient CV over time", [_target(_named(_sel(cv)), legend=LEGEND)], catalog=c, note=note),
        12,
        8,
    )


def healthy_unit(ratio: MetricSpec) -> str:
    """Grafana custom unit drawing the healthy label: "ratio={value}" gives "prefix:ratio="."""
    prefix, _, suffix = ratio.level("healthy").label.partition("{value}")
    if prefix and not suffix:
        return f"prefix:{prefix}"
    if suffix and not prefix:
        return f"suffix:{suffix}"
    return _unit(ratio)


def _seeds_row(b: _Builder) -> None:
    c = b.catalog
    ratio = c["seed_grad_ratio"]
    r = _sel(ratio, env=True)
    codes = flag_codes(ratio)
    # Priority as TELE-557 shows it: each raised flag's code in turn, then the ratio itself.
    # `or` picks the first that exists per seed, with no arithmetic on the ratio (Inf * 0 is NaN).
    raised = [f"{code} * ({_sel(c[flag], env=True)} == 1)" for flag, code in codes.items()]
    gradient = {"mappings": seed_mappings(c, ratio), "unit": healthy_unit(ratio)}
    columns: dict[str, tuple[str, Json]] = {"Gradient": (" or ".join([*raised, r]), gradient), "Ratio": (r, {})}
    for flag in codes:
        steps = thresholds(_flag_steps(c, ratio, c[flag]))
        level = next(lv for lv in ratio.levels if lv.flag == flag)
        columns[level.name.capitalize()] = (_sel(c[flag], env=True), {"decimals": 0, "thresholds": steps})
    flags = ", then ".join(c[flag].name for flag in codes)
    no_data = ratio.level_of(0.0)
    note = (
        f"{_boundary_note(ratio)} Gradient column: {flags}, then the ratio's own level"
        f' (a ratio of 0, no gradient data, shows "{no_data.label if no_data else 0}").'
    )
    b.row("Seeds")
    b.add(
        _table(
            ratio,
            "Seeds: gradient flow per env and slot",
            columns,
            catalog=c,
            defaults={
                "decimals": ratio.precision,
                "thresholds": thresholds(level_steps(c, ratio)),
                "unit": _unit(ratio),
            },
            description=_description(ratio, note),
        ),
        24,
        10,
    )


def _flag_steps(catalog: Catalog, ratio: MetricSpec, flag: MetricSpec) -> list[Json]:
    """A 0/1 flag column: 0 is ok, 1 in the colour of the level it flags (TELE-557: vanishing yellow)."""
    level = next(lv for lv in ratio.levels if lv.flag == flag.id)
    return [{"color": catalog.colour("ok"), "value": None}, {"color": catalog.colour(level.status), "value": 1}]


def stale_steps(catalog: Catalog, spec: MetricSpec) -> list[Json]:
    """Seconds since the last update: ok, then critical once older than the stale alert's `after`."""
    stale = next(a for a in spec.alerts if a.kind == "stale")
    assert stale.after is not None
    limit = math.nextafter(duration_seconds(stale.after), math.inf)
    return [{"color": catalog.colour("ok"), "value": None}, {"color": catalog.colour(stale.severity), "value": limit}]


def _alerts_row(b: _Builder) -> None:
    c = b.catalog
    last = c["last_update_timestamp"]
    b.row("Alerts")
    b.add(
        {
            "type": "alertlist",
            "title": "Tele alerts firing",
            "description": "Which Tele alerts are firing now? Rules come from the Prometheus data"
            " source (generated from the catalog); this list is not a PromQL query.",
            "fieldConfig": {"defaults": {"unit": "none"}, "overrides": []},
            "options": {
                "alertInstanceLabelFilter": "",
                "alertName": "Tele",
                "dashboardAlerts": False,
                "groupBy": [],
                "groupMode": "default",
                "maxItems": 20,
                "sortOrder": 1,
                "stateFilter": {
                    "error": True,
                    "firing": True,
                    "noData": False,
                    "normal": False,
                    "pending": False,
                },
                "viewMode": "list",
            },
        },
        12,
        8,
    )
    b.add(
        _stat(
            last,
            "Tele alerts firing (count)",
            'count(ALERTS{alertname=~"Tele.*", alertstate="firing", job=~"$job"}) or vector(0)',
            catalog=c,
            graph=False,
            steps=_count_steps(c),
            color_mode="background",
            decimals=0,
            unit="none",
            description="How many Tele alerts are firing now? (Prometheus ALERTS series, 0 when none.)",
        ),
        6,
        8,
    )
    stale = next(a for a in last.alerts if a.kind == "stale")
    # Whole seconds, rounded up: ceil(x) > limit exactly when x > limit, so the colour turns
    # with the alert and the text ("10 minutes" / "10 minutes, 1 second") differs across it.
    seconds = f"ceil(time() - max by (instance, rank) ({_sel(last)}))"
    b.add(
        _stat(
            last,
            "Time since the last PPO update",
            seconds,
            catalog=c,
            graph=False,
            steps=stale_steps(c, last),
            unit="dtdurations",
            decimals=1,  # two units: "9 minutes, 59 seconds", "10 minutes, 0 seconds", "10 minutes, 1 second"
            note=f"Red once the latest update is older than {stale.after}, when {stale.name} fires.",
        ),
        6,
        8,
    )


def _datasource_var() -> Json:
    """The Prometheus data source, defaulting to the provisioned one."""
    return {
        "current": {"text": "Prometheus", "value": PROMETHEUS_UID},
        "label": "Data source",
        "name": "datasource",
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "type": "datasource",
    }


def dashboard(catalog: Catalog) -> Json:
    """The whole dashboard as a plain dict (classic JSON model, rows as row panels)."""
    b = _Builder(catalog)
    _policy_row(b)
    _gradients_row(b)
    _heads_row(b)
    _cv_row(b)
    _seeds_row(b)
    _alerts_row(b)
    updates = catalog["ppo_updates"].name
    ratio = catalog["seed_grad_ratio"].name
    variables = [
        _datasource_var(),
        _query_var("job", "Job", updates, ""),
        _query_var("instance", "Instance", updates, 'job=~"$job"'),
        _query_var("env", "Env", ratio, 'job=~"$job", instance=~"$instance"'),
    ]
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "Training health of a PPO run, coloured by the TELE records' thresholds"
        " (generated from the tele-exporter catalog; do not edit by hand).",
        "editable": False,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": b.panels,
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": TAGS,
        "templating": {"list": variables},
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": TITLE,
        "uid": UID,
        "version": 1,
        "weekStart": "",
    }


def _query_var(name: str, label: str, metric: str, matchers: str) -> Json:
    """A multi-value label variable with "All" (.*) filled from the metric's series."""
    q = f"label_values({metric}{{{matchers}}}, {name})" if matchers else f"label_values({metric}, {name})"
    return {
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "datasource": DATASOURCE,
        "includeAll": True,
        "label": label,
        "multi": True,
        "name": name,
        "options": [],
        "query": {"qryType": 1, "query": q, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "type": "query",
    }
