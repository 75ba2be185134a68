"""Grafana panel primitives: one function per panel, target, override or variable, as classic-JSON dicts.

Thin and catalog-free, so the dashboard layout (generate/dashboards.py) reads as which panel goes where.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Json = dict[str, Any]

# Every query goes to the data source the dashboard's `datasource` variable picks.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Who a series comes from: the run (the `run` const label the README gives every run), the scrape
# target, and the rank under torchrun (docs/scale.md). Tables keep each as a column.
RUN_LABEL = "run"
SOURCE_LABELS = ("job", RUN_LABEL, "instance", "rank")
SOURCE_COLUMNS = {RUN_LABEL: "Run", "instance": "Instance", "rank": "Rank"}
# Legends name the run, and the rank where the series has one, whatever port the run was given:
# query-time labels, RUN_TEXT the `run` label (the instance for a series without one) and
# RANK_TEXT " rank N" only when `rank` is set, so no stray word is shown without it.
RUN_TEXT = "run_text"
RANK_TEXT = "rank_text"
LEGEND = "{{" + RUN_TEXT + "}}{{" + RANK_TEXT + "}}"
# Table cells coloured by their value: NaN reads red, levels show their colours.
COLOR_TEXT = {"type": "color-text"}


def named(expr: str) -> str:
    """`expr` with the RUN_TEXT and RANK_TEXT labels the LEGEND needs."""
    source = f'label_replace({expr}, "{RUN_TEXT}", "$1", "instance", "(.*)")'
    run = f'label_replace({source}, "{RUN_TEXT}", "$1", "{RUN_LABEL}", "(.+)")'
    return f'label_replace({run}, "{RANK_TEXT}", " rank $1", "rank", "(.+)")'


def target(expr: str, ref: str = "A", legend: str = "__auto", **extra: Any) -> Json:
    """A Prometheus range query in code mode; `extra` sets or overrides its fields."""
    query: Json = {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        "refId": ref,
    }
    query.update(extra)
    return query


def instant(expr: str, ref: str, labels: Sequence[str]) -> Json:
    """A table target: one row per series of `labels` (and its source), without `__name__`."""
    by = ", ".join([*SOURCE_LABELS, *labels])
    return target(f"max by ({by}) ({expr})", ref, "__auto", format="table", instant=True, range=False)


def merged_table(renames: dict[str, str]) -> list[Json]:
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


def override(name: str, **properties: Any) -> Json:
    """A field override for the column called `name` (after the organize transformation)."""
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": key, "value": value} for key, value in properties.items()],
    }


def fixed(ref: str, colour: str, **properties: Any) -> Json:
    """A field override painting every field of the query `ref` in `colour`."""
    props = {"color": {"mode": "fixed", "fixedColor": colour}, **properties}
    return {
        "matcher": {"id": "byFrameRefID", "options": ref},
        "properties": [{"id": key, "value": value} for key, value in props.items()],
    }


def thresholds(steps: list[Json]) -> Json:
    """Absolute threshold steps, as a field config's `thresholds`."""
    return {"mode": "absolute", "steps": steps}


def row(title: str) -> Json:
    """An expanded row heading; the layout gives it its id and place."""
    return {"collapsed": False, "panels": [], "title": title, "type": "row"}


def stat(
    title: str,
    description: str,
    targets: list[Json],
    *,
    decimals: int,
    mappings: list[Json],
    steps: list[Json],
    unit: str,
    graph: bool,
    color_mode: str = "value",
    overrides: list[Json] | None = None,
) -> Json:
    """A stat of each series' last value, coloured by `steps` (and `mappings`), with a sparkline if `graph`."""
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "decimals": decimals,
                "mappings": mappings,
                "thresholds": thresholds(steps),
                "unit": unit,
            },
            "overrides": overrides or [],
        },
        "options": {
            "colorMode": color_mode,
            "graphMode": "area" if graph else "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "percentChangeColorMode": "standard",
            "reduceOptions": {"calcs": ["last"], "fields": "", "values": False},
            "showPercentChange": False,
            "textMode": "auto",
            "wideLayout": True,
        },
        "targets": targets,
    }


def timeseries(
    title: str,
    description: str,
    targets: list[Json],
    *,
    decimals: int,
    mappings: list[Json],
    steps: list[Json],
    unit: str,
    minimum: float | None,
    overrides: list[Json],
) -> Json:
    """Lines over threshold bands (`steps` drawn as line and area), with a table legend of last and max."""
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
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
                "decimals": decimals,
                "mappings": mappings,
                **({} if minimum is None else {"min": minimum}),  # no floor: a signed metric (log-probabilities)
                "thresholds": thresholds(steps),
                "unit": unit,
            },
            "overrides": overrides,
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


def table(
    title: str,
    description: str,
    columns: dict[str, tuple[str, Json]],
    *,
    labels: Sequence[str],
    defaults: Json,
) -> Json:
    """One row per series of `labels`: `columns` maps a header to (PromQL, its field overrides).

    Label columns are text as they are (unit "string": Grafana would read env "0" as a number);
    value columns colour their text (COLOR_TEXT). `defaults` is the field config of every column.
    """
    headers = {name: name.capitalize() for name in labels}
    refs = {header: chr(ord("A") + i) for i, header in enumerate(columns)}
    renames = {**headers, **{f"Value #{refs[h]}": h for h in columns}}
    plain = {"unit": "string", "custom.cellOptions": {"type": "auto"}}
    return {
        "type": "table",
        "title": title,
        "description": description,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "custom": {"align": "auto", "inspect": False, "cellOptions": COLOR_TEXT},
                **defaults,
            },
            "overrides": [
                *(override(name, **plain) for name in [*SOURCE_COLUMNS.values(), *headers.values()]),
                *(override(header, **props) for header, (_, props) in columns.items() if props),
            ],
        },
        "options": {
            "cellHeight": "sm",
            "frameIndex": 0,
            "showHeader": True,
            "sortBy": [{"desc": False, "displayName": next(iter(headers.values()), SOURCE_COLUMNS["instance"])}],
        },
        "targets": [instant(expr, refs[header], labels) for header, (expr, _) in columns.items()],
        "transformations": merged_table(renames),
    }


def _scheme(scheme: str, *, scale: str, reverse: bool) -> Json:
    """A heatmap's colour options: one of Grafana's colour schemes in 64 steps."""
    return {
        "exponent": 0.5,
        "fill": "dark-orange",
        "mode": "scheme",
        "reverse": reverse,
        "scale": scale,
        "scheme": scheme,
        "steps": 64,
    }


def _heatmap(title: str, description: str, query: Json, unit: str, options: Json) -> Json:
    """A heatmap that calculates nothing (Grafana lays out what Prometheus returned) with `options` on top."""
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "fieldConfig": {
            "defaults": {
                "custom": {"hideFrom": {"legend": False, "tooltip": False, "viz": False}},
                "unit": unit,
            },
            "overrides": [],
        },
        "options": {
            "calculate": False,
            "cellGap": 1,
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "legend": {"show": True},
            "showValue": "never",
            **options,
        },
        "targets": [query],
    }


def heatmap(title: str, description: str, query: Json, *, unit: str) -> Json:
    """Buckets already counted by Prometheus (no calculation) on an exponential orange scale."""
    return _heatmap(
        title,
        description,
        query,
        unit,
        {
            "color": _scheme("Oranges", scale="exponential", reverse=False),
            "filterValues": {"le": 1e-9},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "showColorScale": False, "yHistogram": True},
            "yAxis": {"axisPlacement": "left", "reverse": False, "unit": unit},
        },
    )


def rows_heatmap(title: str, description: str, query: Json, *, unit: str) -> Json:
    """One row per series (each named by its legend), one column per scrape, coloured by value: series x time.

    Nothing calculated: Grafana joins the series on time and lays them out as unordered rows
    (layout "unknown": rows that are no bucket bounds; a legend that reads as a number would be taken for one).
    """
    return _heatmap(
        title,
        description,
        query,
        unit,
        {
            "color": _scheme("Spectral", scale="linear", reverse=True),
            # Grafana's default hides cells <= 1e-9 (empty buckets): values here may be negative (log10), hide none.
            "filterValues": {"le": -1e9},
            "rowsFrame": {"layout": "unknown"},
            "tooltip": {"mode": "single", "showColorScale": True, "yHistogram": False},
            "yAxis": {"axisPlacement": "left", "reverse": False, "unit": "string"},
        },
    )


def alertlist(title: str, description: str, *, alert_name: str, max_items: int) -> Json:
    """The alert rules whose name contains `alert_name` that are firing or failing now."""
    return {
        "type": "alertlist",
        "title": title,
        "description": description,
        "fieldConfig": {"defaults": {"unit": "none"}, "overrides": []},
        "options": {
            "alertInstanceLabelFilter": "",
            "alertName": alert_name,
            "dashboardAlerts": False,
            "groupBy": [],
            "groupMode": "default",
            "maxItems": max_items,
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
    }


def datasource_variable(uid: str) -> Json:
    """The `datasource` variable every target reads (DATASOURCE), defaulting to the Prometheus `uid`."""
    return {
        "current": {"text": "Prometheus", "value": uid},
        "label": "Data source",
        "name": "datasource",
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "type": "datasource",
    }


def query_variable(name: str, label: str, series: str) -> Json:
    """A multi-value variable of `name`'s label values on `series`, with "All" (.*)."""
    return {
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "datasource": DATASOURCE,
        "includeAll": True,
        "label": label,
        "multi": True,
        "name": name,
        "options": [],
        "query": {
            "qryType": 1,
            "query": f"label_values({series}, {name})",
            "refId": "PrometheusVariableQueryEditor-VariableQuery",
        },
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "type": "query",
    }
