"""Grafana dashboard "TELE training health", generated from the catalog.

Every metric name, threshold, label, colour and question comes from the catalog; the
field configuration each level becomes (steps, mappings, codes) is built in `levels`.
This module lays the panels out and writes their queries.
"""

from __future__ import annotations

import json
from typing import Any

from ..catalog.model import Catalog, MetricSpec
from ..catalog.thresholds import THRESHOLD_METRIC, movable
from .levels import (
    count_steps,
    flag_codes,
    flag_steps,
    grafana_unit,
    healthy_unit,
    level_code_mappings,
    level_code_query,
    level_steps,
    neutral_steps,
    seed_mappings,
    seed_query,
    seed_value_steps,
    stale_steps,
    thresholds,
    trend_mappings,
    trend_query,
    with_nan,
)
from .promql import RunStarts, matcher, number, selector, threshold_selector

PATH = "grafana/dashboards/tele-training-health.json"
UID = "tele-training-health"
TITLE = "TELE training health"
TAGS = ["tele", "pytorch", "rl"]
SCHEMA_VERSION = 42
PROMETHEUS_UID = "tele-prometheus"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WIDTH = 24

Json = dict[str, Any]


def files(catalog: Catalog) -> dict[str, str]:
    """The dashboard JSON file, deterministic (sorted keys, two-space indent)."""
    return {PATH: json.dumps(dashboard(catalog), indent=2, sort_keys=True, ensure_ascii=False) + "\n"}


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


# The series the dashboard's job and instance variables select.
VARIABLES = (matcher("job", "$job", "=~"), matcher("instance", "$instance", "=~"))


def _sel(spec: MetricSpec, labels: dict[str, str] | None = None, *, env: bool = False, suffix: str = "") -> str:
    """The metric selected by the dashboard's job/instance (and env) variables, and `labels`."""
    matchers = [*VARIABLES, matcher("env", "$env", "=~")] if env else VARIABLES
    return selector(f"{spec.name}{suffix}", labels, matchers=matchers)


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


# Who a series comes from: the scrape target, and the rank under torchrun (docs/scale.md).
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


def _boundary_note(spec: MetricSpec, steps: bool = True) -> str:
    """Plain words on the catalog's levels and, where threshold `steps` draw them, how exactly."""
    words = ", ".join(f"{lv.label.replace('{value}', 'value')} {lv.when}" for lv in spec.levels)
    opened = [lv.when.low for lv in spec.levels if not lv.when.low_closed]
    note = f"Levels from the catalog: {words}."
    if opened and steps:
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
                "unit": grafana_unit(spec) if unit is None else unit,
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


# Per-run stats read each run's level at the end of the range: a series is in one query only.
AT_END = " @ end()"
# The query of a per-run stat that holds the series in no level at the end (NaN, or gone before it).
REST_REF = "A"


def _fixed(ref: str, colour: str, **properties: Any) -> Json:
    """A field override painting every field of the query `ref` in `colour`."""
    props = {"color": {"mode": "fixed", "fixedColor": colour}, **properties}
    return {
        "matcher": {"id": "byFrameRefID", "options": ref},
        "properties": [{"id": key, "value": value} for key, value in props.items()],
    }


def _own_levels_stat(spec: MetricSpec, title: str, value: str, *, catalog: Catalog, note: str) -> Json:
    """A number stat coloured by each run's own levels: one query per level, painted in its colour.

    Query `level.name` holds the series whose run puts its value at the range's end in that
    level (tele_threshold, compared as the alert rules compare; the catalog's starts without
    it), so the sparkline stays and its colour is the current level. REST_REF holds the rest,
    NaN at the end (shown "NaN" in the critical colour: a value mapping beats the fixed colour)
    or gone before it, coloured by the catalog's thresholds.
    """
    code = _level_code(catalog, spec, value + AT_END, AT_END)
    words = (
        " Each run's number is coloured by its own levels (the starts it exports as tele_threshold;"
        " the catalog's unless Telemetry(thresholds=...) moved them) at the end of the time range."
    )
    panel = _stat(spec, title, value, catalog=catalog, graph=True, note=note + words)
    rest = _target(_named(f"{value} unless ({code}) >= 0"), REST_REF, LEGEND)
    panel["targets"] = [rest] + [
        _target(_named(f"{value} and ({code}) == {i}"), level.name, LEGEND) for i, level in enumerate(spec.levels)
    ]
    panel["fieldConfig"]["overrides"] = [_fixed(level.name, catalog.colour(level.status)) for level in spec.levels]
    return panel


OWN_LABEL = (
    " The label is the level of each run's own thresholds (tele_threshold, the catalog's unless the run sets"
    " its own), compared as the alert rules compare."
)


def _label_stat(spec: MetricSpec, title: str, *, catalog: Catalog, note: str) -> Json:
    """A stat showing each run's level label on its own levels, in the level's colour."""
    return _stat(
        spec,
        title,
        _level_code(catalog, spec, _sel(spec)),
        catalog=catalog,
        graph=False,
        mappings=level_code_mappings(catalog, spec),
        steps=neutral_steps(catalog),
        color_mode="background",
        note=note,
    )


def _own_starts(catalog: Catalog, spec: MetricSpec) -> tuple[list[Json], list[Json]]:
    """Dashed lines at each run's own level starts where they differ from the catalog's (targets, overrides)."""
    targets, overrides = [], []
    for level in movable(spec):
        ref = f"own {level.name}"
        start = threshold_selector(catalog[THRESHOLD_METRIC].name, spec.name, level.name, matchers=VARIABLES)
        targets.append(_target(_named(f"{start} != {number(level.when.low)}"), ref, f"{LEGEND} {level.name}"))
        dash = {"fill": "dash", "dash": [10, 10]}
        overrides.append(_fixed(ref, catalog.colour(level.status), **{"custom.lineStyle": dash, "custom.lineWidth": 1}))
    return targets, overrides


def _timeseries(
    spec: MetricSpec,
    title: str,
    targets: list[Json],
    *,
    catalog: Catalog,
    steps: list[Json] | None = None,
    note: str = "",
    minimum: float | None = 0,
) -> Json:
    """Lines per run over the catalog's threshold bands, plus the dashed own starts of runs that moved them."""
    own: tuple[list[Json], list[Json]] = ([], []) if steps is not None else _own_starts(catalog, spec)
    if own[0]:
        note += (
            " Dashed lines: a run's own level starts (tele_threshold), drawn only where they differ"
            " from the catalog's; the bands are the catalog's levels."
        )
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
                "min": minimum,
                "thresholds": thresholds(steps if steps is not None else level_steps(catalog, spec)),
                "unit": grafana_unit(spec),
            },
            "overrides": own[1],
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
        "targets": [*targets, *own[0]],
    }


def _policy_row(b: _Builder) -> None:
    c = b.catalog
    kl, early, updates = c["kl_divergence"], c["ppo_early_stops"], c["ppo_updates"]
    b.row("Policy")
    b.add(_own_levels_stat(kl, "KL divergence", _sel(kl), catalog=c, note=_boundary_note(kl)), 6, 8)
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
            steps=neutral_steps(c),
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
            steps=neutral_steps(c),
        ),
        3,
        4,
    )


def _policy_health_row(b: _Builder) -> None:
    """TELE-120/121/124/130/140/151/200: entropy, its velocity and collapse, clipping, value and advantages."""
    c = b.catalog
    ent, vel, collapsed = c["policy_entropy"], c["entropy_velocity"], c["entropy_collapsed"]
    cf, side, ev, adv, ratio = (
        c["clip_fraction"],
        c["clip_fraction_side"],
        c["explained_variance"],
        c["advantage_std"],
        c["head_ratio_max"],
    )
    b.row("Policy health")
    b.add(_own_levels_stat(ent, "Policy entropy", _sel(ent), catalog=c, note=_boundary_note(ent)), 6, 8)
    velocity_note = (
        f"{_boundary_note(vel, steps=False)} The recording rule instance:{ent.name}:deriv_per_update5m is the same"
        " slope from PromQL (deriv over 5m per update), an approximation: its window is time, not 10 updates."
    )
    b.add(_label_stat(vel, "Entropy velocity", catalog=c, note=velocity_note + OWN_LABEL), 4, 8)
    b.add(
        _label_stat(collapsed, "Entropy collapsed", catalog=c, note=_boundary_note(collapsed, steps=False) + OWN_LABEL),
        4,
        8,
    )
    b.add(
        _timeseries(
            ent,
            "Policy entropy over time",
            [_target(_named(_sel(ent)), legend=LEGEND)],
            catalog=c,
            note=_boundary_note(ent),
        ),
        10,
        8,
    )
    b.add(_own_levels_stat(cf, "PPO clip fraction", _sel(cf), catalog=c, note=_boundary_note(cf)), 6, 8)
    b.add(
        _timeseries(
            side,
            "PPO clip fraction by side",
            [_target(_named(_sel(side)), legend=LEGEND + " {{side}}")],
            catalog=c,
            steps=neutral_steps(c),
        ),
        6,
        8,
    )
    b.add(_own_levels_stat(ev, "Explained variance", _sel(ev), catalog=c, note=_boundary_note(ev)), 6, 8)
    b.add(_own_levels_stat(adv, "Advantage std", _sel(adv), catalog=c, note=_boundary_note(adv)), 6, 8)
    b.add(
        _timeseries(
            ratio,
            "Importance ratio max per head",
            [_target(_named(_sel(ratio)), legend=LEGEND + " {{head}}")],
            catalog=c,
            note=_boundary_note(ratio),
        ),
        24,
        8,
    )


def _gradients_row(b: _Builder) -> None:
    c = b.catalog
    g, hist = c["policy_grad_norm"], c["step_policy_grad_norm"]
    note = _boundary_note(g) + " Alerts watch the pre-clip norm; post-clip never exceeds max_norm."
    b.row("Gradients")
    for clip, word in (("pre", "pre-clip"), ("post", "post-clip")):
        b.add(
            _timeseries(
                g,
                f"Policy gradient norm, {word}",
                [_target(_named(_sel(g, {"clip": clip})), legend=f"{LEGEND} {word}")],
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
                    "unit": grafana_unit(hist),
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
                "yAxis": {"axisPlacement": "left", "reverse": False, "unit": grafana_unit(hist)},
            },
            "targets": [
                _target(
                    f"sum by (le) (increase({_sel(hist, dict(g.alert_on), suffix='_bucket')}[$__rate_interval]))",
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
            "sortBy": [{"desc": False, "displayName": next(iter(labels.values()), SOURCE_COLUMNS["instance"])}],
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
    ent = c["head_entropy"]
    entropy = {"decimals": ent.precision}
    level = {"decimals": 0, "mappings": with_nan(c, level_code_mappings(c, ent))}
    note += (
        f" Entropy: {ent.name} (TELE-170), {_boundary_note(ent, steps=False)} Entropy level: the head's level"
        " on its run's own levels (tele_threshold; the catalog's without), in its colour; a table colours a cell"
        " by its own column only, so the number beside it stays plain."
    )
    b.add(
        _table(
            cur,
            "Action heads: gradient norm, trend and entropy",
            {
                "Current": (_sel(cur), {}),
                "Previous": (_sel(prev), {}),
                "Trend": (code, trend),
                "Entropy": (_sel(ent), entropy),
                "Entropy level": (_level_code(c, ent, _sel(ent)), level),
            },
            catalog=c,
            defaults={"decimals": cur.precision, "thresholds": thresholds(neutral_steps(c)), "unit": grafana_unit(cur)},
            description=_description(prev, note),
        ),
        24,
        9,
    )


def _level_code(catalog: Catalog, spec: MetricSpec, expr: str, at: str = "") -> str:
    """The index of each series' level among its own run's levels (tele_threshold; the catalog's without)."""
    name = catalog[THRESHOLD_METRIC].name

    def threshold(level: str | None) -> str:
        return threshold_selector(name, spec.name, level, matchers=VARIABLES)

    return level_code_query(RunStarts(spec, threshold, at), expr)


LEVELS_TITLE = "Levels per run"


def _levels_row(b: _Builder) -> None:
    """One row per run: the level KL, pre-clip gradient norm and CV are in, on the run's own thresholds."""
    c = b.catalog
    kl, g, cv = c["kl_divergence"], c["policy_grad_norm"], c["gradient_cv"]
    columns = {
        "KL": (_level_code(c, kl, _sel(kl)), {"mappings": with_nan(c, level_code_mappings(c, kl))}),
        "Gradient norm (pre-clip)": (
            _level_code(c, g, _sel(g, dict(g.alert_on))),
            {"mappings": with_nan(c, level_code_mappings(c, g))},
        ),
        "Gradient CV": (_level_code(c, cv, _sel(cv)), {"mappings": with_nan(c, level_code_mappings(c, cv))}),
    }
    b.add(
        _table(
            kl,
            LEVELS_TITLE,
            columns,
            catalog=c,
            defaults={"decimals": 0, "thresholds": thresholds(neutral_steps(c)), "unit": "none"},
            description=_description(
                c[THRESHOLD_METRIC],
                "The level each run is in on its own thresholds (the starts it exports; the catalog's unless "
                "Telemetry(thresholds=...) moved them), compared with the alert rules' operators: the level "
                "shown is the level alerted on. The number panels colour each run by the same levels.",
            ),
        ),
        24,
        6,
    )


def _cv_row(b: _Builder) -> None:
    c = b.catalog
    cv = c["gradient_cv"]
    note = _boundary_note(cv)
    b.row("Gradient CV")
    b.add(_own_levels_stat(cv, "Gradient CV", _sel(cv), catalog=c, note=note), 6, 8)
    b.add(_label_stat(cv, "Gradient CV status", catalog=c, note=OWN_LABEL.strip()), 6, 8)
    b.add(
        _timeseries(cv, "Gradient CV over time", [_target(_named(_sel(cv)), legend=LEGEND)], catalog=c, note=note),
        12,
        8,
    )


def _seeds_row(b: _Builder) -> None:
    c = b.catalog
    ratio = c["seed_grad_ratio"]
    r = _sel(ratio, env=True)
    codes = flag_codes(ratio)
    # Priority as TELE-557 shows it: each raised flag's code in turn, then the ratio itself.
    # `or` picks the first that exists per seed, with no arithmetic on the ratio (Inf * 0 is NaN).
    raised = [f"{code} * ({_sel(c[flag], env=True)} == 1)" for flag, code in codes.items()]
    gradient = {
        "mappings": seed_mappings(c, ratio),
        "unit": healthy_unit(ratio),
        "thresholds": thresholds(seed_value_steps(c, ratio)),
    }
    columns: dict[str, tuple[str, Json]] = {
        "Gradient": (seed_query(ratio, raised, r, _level_code(c, ratio, r)), gradient),
        "Ratio": (r, {}),
        "Backward gain": (_sel(c["seed_backward_gain"], env=True), {}),
    }
    for flag in codes:
        steps = thresholds(flag_steps(c, ratio, c[flag]))
        level = next(lv for lv in ratio.levels if lv.flag == flag)
        columns[level.name.capitalize()] = (_sel(c[flag], env=True), {"decimals": 0, "thresholds": steps})
    flags = ", then ".join(c[flag].name for flag in codes)
    no_data = ratio.level_of(0.0)
    note = (
        f"{_boundary_note(ratio, steps=False)} Gradient column: {flags}, then the ratio's level on its run's own levels"
        f" (tele_threshold; the catalog's without), compared as the alert rules compare"
        f' (a ratio of 0, no gradient data, shows "{no_data.label if no_data else 0}"). A table colours a cell'
        " by its own column only, so the Ratio beside it stays plain."
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
                "thresholds": thresholds(neutral_steps(c)),
                "unit": grafana_unit(ratio),
            },
            description=_description(ratio, note),
        ),
        24,
        10,
    )


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
            'count(ALERTS{alertname=~"Tele.*", alertstate="firing", job=~"$job", instance=~"$instance"}) or vector(0)',
            catalog=c,
            graph=False,
            steps=count_steps(c),
            color_mode="background",
            decimals=0,
            unit="none",
            description="How many Tele alerts are firing now for the selected instances?"
            " (Prometheus ALERTS series, 0 when none.)",
        ),
        6,
        8,
    )
    stale = next(a for a in last.alerts if a.kind == "stale")
    # Whole seconds, rounded up: ceil(x) > limit exactly when x > limit, so the colour turns
    # with the alert and the text ("00:10:00" / "00:10:01") differs across it.
    seconds = f"ceil(time() - max by (instance, rank) ({_sel(last)}))"
    b.add(
        _stat(
            last,
            "Time since the last PPO update",
            seconds,
            catalog=c,
            graph=False,
            steps=stale_steps(c, last),
            unit="dthms",  # "00:09:59", "00:10:00" green; "00:10:01" red
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
    _levels_row(b)
    _policy_health_row(b)
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
