"""The generated Grafana dashboard and its provisioning agree with the catalog, exactly.

Thresholds and value mappings are checked by what they do: every catalog boundary,
the doubles either side of it and points between boundaries are coloured (and
labelled) the way Grafana would, and must match the catalog's level for that value.
The PromQL that feeds value mappings (head trends, seed display priority) is
evaluated by `promtool test rules` on synthetic series at the boundaries.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tele_exporter.catalog import Catalog, MetricSpec, default_catalog, duration_seconds
from tele_exporter.catalog.display import head_trend, show
from tele_exporter.catalog.thresholds import signals
from tele_exporter.generate import dashboards, levels

ROOT = Path(__file__).resolve().parents[2]
PROVISIONING = ROOT / "grafana" / "provisioning"
Panel = dict[str, Any]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return default_catalog()


@pytest.fixture(scope="module")
def board(catalog: Catalog) -> dict[str, Any]:
    return dashboards.dashboard(catalog)


def panels(board: dict[str, Any]) -> Iterator[Panel]:
    """Every panel that shows data (rows are only headings)."""
    return (p for p in board["panels"] if p["type"] != "row")


def panel(board: dict[str, Any], title: str) -> Panel:
    return next(p for p in board["panels"] if p["title"] == title)


def metrics_in(catalog: Catalog, expr: str) -> list[MetricSpec]:
    """Catalog metrics an expression reads (histogram series by their family name)."""
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return [s for s in catalog if s.name in names or {f"{s.name}_bucket", f"{s.name}_sum", f"{s.name}_count"} & names]


def grafana_colour(steps: list[dict[str, Any]], value: float) -> str:
    """Grafana's getActiveThreshold: the last step whose value is <= value (base is -inf)."""
    active = steps[0]
    for step in steps[1:]:
        if value >= step["value"]:
            active = step
        else:
            break
    return str(active["color"])


def grafana_mapping(mappings: list[dict[str, Any]], value: float) -> dict[str, Any] | None:
    """Grafana's getValueMappingResult for numbers: value maps, then ranges (both ends in)."""
    for mapping in mappings:
        opts = mapping["options"]
        if mapping["type"] == "value":
            key = repr(value) if not float(value).is_integer() else str(int(value))
            if key in opts:
                return dict(opts[key])
        elif mapping["type"] == "range":
            low = -math.inf if opts["from"] is None else opts["from"]
            high = math.inf if opts["to"] is None else opts["to"]
            if low <= value <= high:
                return dict(opts["result"])
    return None


def probes(spec: MetricSpec) -> list[float]:
    """Each boundary, the doubles just below and above it, and points between boundaries."""
    edges = sorted(spec.thresholds())
    out = {0.0, edges[-1] * 10 + 1}
    for t in edges:
        out |= {t, math.nextafter(t, math.inf), math.nextafter(t, -math.inf)}
    out |= {(a + b) / 2 for a, b in itertools.pairwise(edges)}
    return sorted(v for v in out if v >= 0)


def test_committed_dashboard_is_not_stale(catalog: Catalog) -> None:
    for rel, content in dashboards.files(catalog).items():
        path = ROOT / rel
        assert path.exists(), f"{rel} is missing: run `tele-exporter generate`"
        assert path.read_text(encoding="utf-8") == content, f"{rel} is stale: run `tele-exporter generate`"


def test_output_is_deterministic(catalog: Catalog) -> None:
    assert dashboards.files(catalog) == dashboards.files(default_catalog())


def test_identity(board: dict[str, Any]) -> None:
    assert board["uid"] == "tele-training-health"
    assert board["title"] == "TELE training health"
    assert set(board["tags"]) >= {"tele", "pytorch", "rl"}
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 39
    names = {v["name"]: v for v in board["templating"]["list"]}
    assert set(names) >= {"datasource", "job", "instance", "env"}
    assert names["datasource"]["type"] == "datasource"
    assert names["datasource"]["query"] == "prometheus"


def test_rows(board: dict[str, Any]) -> None:
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == [
        "Policy",
        "Policy health",
        "Gradients",
        "Action heads",
        "Gradient CV",
        "Layers and update ratios",
        "Seeds",
        "Alerts",
    ]


def test_every_panel_has_unit_description_and_datasource(catalog: Catalog, board: dict[str, Any]) -> None:
    for p in panels(board):
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        assert p["description"].strip(), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        read = []
        for target in p.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'job=~"$job"' in target["expr"], (p["title"], target["expr"])
            if "ALERTS" not in target["expr"]:
                read += metrics_in(catalog, target["expr"])
        if read:
            assert any(p["description"].startswith(s.question) for s in read), p["title"]


def test_panels_are_unique_and_on_the_grid(board: dict[str, Any]) -> None:
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]


def test_no_metric_name_is_unknown(catalog: Catalog, board: dict[str, Any]) -> None:
    known = {s.name for s in catalog} | {f"{s.name}_bucket" for s in catalog}
    for p in panels(board):
        for target in p.get("targets", []):
            used = set(re.findall(rf"\b{catalog.namespace}_[a-z0-9_]+", target["expr"]))
            assert used <= known, (p["title"], used - known)


def test_required_panels(catalog: Catalog, board: dict[str, Any]) -> None:
    by_type: dict[str, set[str]] = {}
    for p in panels(board):
        for target in p.get("targets", []):
            for spec in metrics_in(catalog, target["expr"]):
                by_type.setdefault(spec.id, set()).add(p["type"])
    assert {"stat", "timeseries"} <= by_type["kl_divergence"]
    assert "timeseries" in by_type["policy_grad_norm"]
    assert "heatmap" in by_type["step_policy_grad_norm"]
    assert "table" in by_type["head_grad_norm_prev"]
    assert "stat" in by_type["gradient_cv"]
    assert "table" in by_type["seed_grad_ratio"]
    assert any(p["type"] == "alertlist" for p in panels(board))
    kl = panel(board, "KL divergence")
    assert kl["options"]["graphMode"] == "area"
    pre = panel(board, "Policy gradient norm, pre-clip")["targets"][0]["expr"]
    post = panel(board, "Policy gradient norm, post-clip")["targets"][0]["expr"]
    assert 'clip="pre"' in pre and 'clip="post"' in post


def levelled_panels(catalog: Catalog, board: dict[str, Any]) -> Iterator[tuple[Panel, MetricSpec]]:
    """Panels whose queries read one metric with levels and colour by threshold steps: they must follow the catalog.

    Those are the charts' bands and the fallback of the per-run stats (a series in no level at the
    range's end); panels and columns with plain steps show a level code or a plain number instead
    (coloured_by_level_code, tests/grafana/test_display.py). A table is taken column by column: each
    value column that reads one levelled metric, with the thresholds its override gives it (or the
    table's defaults).
    """
    for p in panels(board):
        if p["type"] == "table":
            yield from _levelled_columns(catalog, p)
            continue
        specs = {s.id: s for t in p.get("targets", []) for s in metrics_in(catalog, t["expr"])}
        levelled = [s for s in specs.values() if s.levels]
        if len(levelled) == 1 and len(p["fieldConfig"]["defaults"]["thresholds"]["steps"]) > 1:
            yield p, levelled[0]


def coloured_by_level_code(catalog: Catalog, board: dict[str, Any]) -> set[str]:
    """Ids of the metrics some panel compares with each run's own starts, tele_threshold{metric="..."}."""
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    return {s.id for s in catalog if any(f'metric="{s.name}"' in expr for expr in exprs)}


def _levelled_columns(catalog: Catalog, table: Panel) -> Iterator[tuple[Panel, MetricSpec]]:
    renames = table["transformations"][1]["options"]["renameByName"]
    overrides = {
        o["matcher"]["options"]: {prop["id"]: prop["value"] for prop in o["properties"]}
        for o in table["fieldConfig"]["overrides"]
    }
    defaults = table["fieldConfig"]["defaults"]
    for target in table["targets"]:
        levelled = [s for s in metrics_in(catalog, target["expr"]) if s.levels]
        if len(levelled) != 1:
            continue
        header = renames[f"Value #{target['refId']}"]
        steps = overrides.get(header, {}).get("thresholds", defaults["thresholds"])
        if len(steps["steps"]) == 1:
            continue
        column = {**table, "title": f"{table['title']}: {header}"}
        column["fieldConfig"] = {**table["fieldConfig"], "defaults": {**defaults, "thresholds": steps}}
        yield column, levelled[0]


def test_levelled_panels_cover_every_levelled_metric(catalog: Catalog, board: dict[str, Any]) -> None:
    shown = {spec.id for _, spec in levelled_panels(catalog, board)} | coloured_by_level_code(catalog, board)
    assert shown == {s.id for s in catalog if s.levels and s.type != "histogram"}
    assert coloured_by_level_code(catalog, board) == {s.id for s in signals(catalog)}


def test_per_run_stats_paint_each_level_in_its_colour(catalog: Catalog, board: dict[str, Any]) -> None:
    """One query per level, painted by a byFrameRefID override; the rest keeps the catalog's steps."""
    split = [p for p in panels(board) if p["type"] == "stat" and len(p["targets"]) > 1]
    assert {p["title"] for p in split} >= {"KL divergence", "Gradient CV", "Policy entropy", "PPO clip fraction"}
    for p in split:
        (spec,) = {s.id: s for s in metrics_in(catalog, p["targets"][0]["expr"]) if s.levels}.values()
        assert [t["refId"] for t in p["targets"]] == [dashboards.REST_REF, *(lv.name for lv in spec.levels)]
        painted = {
            o["matcher"]["options"]: o["properties"]
            for o in p["fieldConfig"]["overrides"]
            if o["matcher"]["id"] == "byFrameRefID"
        }
        assert painted == {
            lv.name: [{"id": "color", "value": {"mode": "fixed", "fixedColor": catalog.colour(lv.status)}}]
            for lv in spec.levels
        }, p["title"]
        for i, (target, level) in enumerate(zip(p["targets"][1:], spec.levels, strict=True)):
            assert f') == {i}, "run_text", "$1", "instance", "(.*)")' in target["expr"], level.name
            assert target["expr"].endswith(', "rank_text", " rank $1", "rank", "(.+)")'), level.name
            assert "@ end()" in target["expr"]


def test_thresholds_colour_every_value_as_the_catalog(catalog: Catalog, board: dict[str, Any]) -> None:
    for p, spec in levelled_panels(catalog, board):
        steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert p["fieldConfig"]["defaults"]["thresholds"]["mode"] == "absolute"
        assert steps[0]["value"] is None
        assert [s["color"] for s in steps] == [catalog.colour(lv.status) for lv in spec.levels]
        for value in [*probes(spec), math.inf]:
            level = spec.level_of(value)
            assert level is not None
            assert grafana_colour(steps, value) == catalog.colour(level.status), (
                p["title"],
                value,
                level.name,
            )


def test_threshold_steps_sit_on_the_catalog_boundaries(catalog: Catalog, board: dict[str, Any]) -> None:
    for p, spec in levelled_panels(catalog, board):
        steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
        for step, level in zip(steps[1:], spec.levels[1:], strict=True):
            low = level.when.low
            expected = low if level.when.low_closed else math.nextafter(low, math.inf)
            assert step["value"] == expected, (p["title"], level.name)


def test_cv_status_labels(catalog: Catalog, board: dict[str, Any]) -> None:
    """The status panel maps its level code (tests/grafana/test_display.py checks the code at every boundary)."""
    cv = catalog["gradient_cv"]
    status = panel(board, "Gradient CV status")
    mappings = status["fieldConfig"]["defaults"]["mappings"]
    assert [lv.label for lv in cv.levels] == ["stable", "warn", "BAD"]
    for code, level in enumerate(cv.levels):
        shown = grafana_mapping(mappings, float(code))
        assert shown == {"text": level.label, "color": catalog.colour(level.status), "index": code}
    expr = status["targets"][0]["expr"]
    assert 'tele_gradient_cv{job=~"$job", run=~"$run", instance=~"$instance"} >= bool 0.5' in expr  # the fallback
    assert 'metric="tele_gradient_cv", level="critical"}' in expr


def seed_table(board: dict[str, Any]) -> Panel:
    return panel(board, "Seeds: gradient flow per env and slot")


def head_table(board: dict[str, Any]) -> Panel:
    return panel(board, "Action heads: gradient norm, trend and entropy")


def override(p: Panel, column: str, prop: str) -> Any:
    """The value a field override sets on one column of a table."""
    for o in p["fieldConfig"]["overrides"]:
        if o["matcher"] == {"id": "byName", "options": column}:
            for item in o["properties"]:
                if item["id"] == prop:
                    return item["value"]
    raise KeyError(f"{p['title']}: no {prop} override for {column}")


def test_seed_mappings_follow_tele_557(catalog: Catalog, board: dict[str, Any]) -> None:
    ratio = catalog["seed_grad_ratio"]
    mappings = override(seed_table(board), "Gradient", "mappings")
    assert seed_table(board)["fieldConfig"]["defaults"]["mappings"] == [levels.nan_mapping(catalog)]
    by_flag = {lv.flag: lv for lv in ratio.levels if lv.flag}
    codes = levels.flag_codes(ratio)
    assert codes["seed_gradient_exploding"] < codes["seed_gradient_vanishing"] < 0
    for flag, code in codes.items():
        level = by_flag[flag]
        result = grafana_mapping(mappings, code)
        assert result is not None
        assert (result["text"], result["color"]) == (level.label, catalog.colour(level.status))
    level_codes = levels.seed_level_codes(ratio)
    assert max(level_codes.values()) < min(codes.values())
    for k, level in enumerate(ratio.levels):
        if "{value}" in level.label:
            assert k not in level_codes
            continue
        result = grafana_mapping(mappings, level_codes[k])
        assert result is not None
        assert (result["text"], result["color"]) == (level.label, catalog.colour(level.status))
    assert ratio.level_of(0.0) == ratio.levels[0] and (ratio.levels[0].label, ratio.levels[0].status) == (
        "no data",
        "neutral",
    )
    healthy = ratio.level("healthy")
    steps = override(seed_table(board), "Gradient", "thresholds")["steps"]
    for value in (healthy.when.low, 1.0, healthy.when.high):
        assert grafana_mapping(mappings, value) is None
        assert grafana_colour(steps, value) == catalog.colour(healthy.status)
    assert seed_table(board)["fieldConfig"]["defaults"]["custom"]["cellOptions"] == {"type": "color-text"}


def test_trend_mappings_cover_every_arrow(catalog: Catalog, board: dict[str, Any]) -> None:
    spec = catalog["head_grad_norm_prev"]
    assert spec.trend is not None
    mappings = override(head_table(board), "Trend", "mappings")
    assert head_table(board)["fieldConfig"]["defaults"]["mappings"] == [levels.nan_mapping(catalog)]
    shown = {(r["text"], r["color"]) for r in mappings[0]["options"].values()}
    expected = {(spec.trend.arrows["stable"], catalog.colour(spec.trend.stable_colour))}
    for ctx in spec.trend.context:
        expected |= {
            (spec.trend.arrows["up"], catalog.colour(ctx.up)),
            (spec.trend.arrows["down"], catalog.colour(ctx.down)),
        }
    assert expected <= shown


def test_staleness_panel_turns_red_with_the_alert(catalog: Catalog, board: dict[str, Any]) -> None:
    spec = catalog["last_update_timestamp"]
    (stale,) = [a for a in spec.alerts if a.kind == "stale"]
    assert stale.after is not None
    limit = duration_seconds(stale.after)
    p = panel(board, "Time since the last PPO update")
    steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert p["fieldConfig"]["defaults"]["unit"] == "dthms"
    # The rule fires on "> after": exactly `after` seconds is still fresh.
    assert grafana_colour(steps, limit) == catalog.colour("ok")
    assert grafana_colour(steps, math.nextafter(limit, math.inf)) == catalog.colour(stale.severity)


def test_datasource_provisioning(board: dict[str, Any]) -> None:
    doc = yaml.safe_load((PROVISIONING / "datasources" / "datasources.yml").read_text())
    assert doc["apiVersion"] == 1
    sources = {d["uid"]: d for d in doc["datasources"]}
    prom = sources[dashboards.PROMETHEUS_UID]
    assert prom["type"] == "prometheus" and prom["url"] == "http://prometheus:9090"
    am_uid = prom["jsonData"]["alertmanagerUid"]
    assert sources[am_uid]["type"] == "alertmanager"
    assert sources[am_uid]["jsonData"]["implementation"] == "prometheus"
    assert [d for d in doc["datasources"] if d.get("isDefault")] == [prom]
    variable = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] in sources


def test_dashboard_provisioning() -> None:
    doc = yaml.safe_load((PROVISIONING / "dashboards" / "dashboards.yml").read_text())
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    sources = {m.split(":")[1]: m.split(":")[0] for m in mounts if isinstance(m, str)}
    assert sources[path] == "./grafana/dashboards"
    assert sources["/etc/grafana/provisioning"] == "./grafana/provisioning"
    jsons = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
    assert jsons
    uids = [json.loads(p.read_text())["uid"] for p in jsons]
    assert len(uids) == len(set(uids))


def _series(name: str, labels: dict[str, str], value: float) -> dict[str, str]:
    text = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{text}}}", "values": repr(value)}


def _substitute(expr: str) -> str:
    for var in ("$job", "$run", "$instance", "$env"):
        expr = expr.replace(var, ".*")
    return expr


def _promtool(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    path = tmp_path / "dashboard_queries_test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": tests}))
    promtool = shutil.which("promtool")
    assert promtool, "needs promtool: apt-get install -y --no-install-recommends prometheus"
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def trend_pairs(catalog: Catalog) -> list[tuple[float, float]]:
    """(current, prev) at every context edge and either side, with deltas at the stable edges."""
    spec = catalog["head_grad_norm_prev"]
    assert spec.trend is not None
    currents = {0.0, 0.05, 1.0, 5.0}
    for t in spec.thresholds():
        currents |= {t, math.nextafter(t, math.inf), math.nextafter(t, -math.inf)}
    deltas = {0.0, 0.5, -0.5, 0.005, -0.005}
    for edge in (spec.trend.stable.low, spec.trend.stable.high):
        deltas |= {edge, math.nextafter(edge, math.inf), math.nextafter(edge, -math.inf)}
    pairs = []
    for cur in sorted(c for c in currents if c >= 0):
        for d in sorted(deltas):
            prev = cur - d
            if prev >= 0:
                pairs.append((cur, prev))
    return pairs


@pytest.mark.servers
def test_trend_query_and_mappings_reproduce_tele_321(catalog: Catalog, board: dict[str, Any], tmp_path: Path) -> None:
    cur_spec, prev_spec = catalog["head_grad_norm"], catalog["head_grad_norm_prev"]
    table = head_table(board)
    expr = _substitute(next(t["expr"] for t in table["targets"] if t["refId"] == "C"))
    mappings = override(table, "Trend", "mappings")
    by_shown = {(r["text"], r["color"]): int(code) for code, r in mappings[0]["options"].items()}
    series, samples = [], []
    for i, (cur, prev) in enumerate([*trend_pairs(catalog), (math.nan, 1.0)]):
        labels = {"head": f"h{i}", "job": "tele", "instance": "x"}
        series += [_series(cur_spec.name, labels, cur), _series(prev_spec.name, labels, prev)]
        arrow = head_trend(prev_spec, cur, prev)
        shown = (
            ("no trend", catalog.colour("neutral")) if arrow is None else (arrow.arrow, catalog.colour(arrow.status))
        )
        samples.append(
            {
                "labels": "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}",
                "value": by_shown[shown],
            }
        )
    series = [{**s, "values": s["values"].replace("nan", "NaN")} for s in series]
    _promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [{"expr": expr, "eval_time": "0m", "exp_samples": samples}],
            }
        ],
    )


@pytest.mark.servers
def test_seed_query_and_mappings_reproduce_tele_557(catalog: Catalog, board: dict[str, Any], tmp_path: Path) -> None:
    ratio = catalog["seed_grad_ratio"]
    table = seed_table(board)
    expr = _substitute(next(t["expr"] for t in table["targets"] if t["refId"] == "A"))
    defaults = table["fieldConfig"]["defaults"]
    mappings = override(table, "Gradient", "mappings")
    unit = override(table, "Gradient", "unit")
    assert unit.startswith("prefix:")
    series, samples = [], []
    for i, value in enumerate(probes(ratio)):
        level = ratio.level_of(value)
        assert level is not None
        exploding = float(level.flag == "seed_gradient_exploding")
        vanishing = float(level.flag == "seed_gradient_vanishing")
        labels = {"env": str(i), "slot": "r0c0", "job": "tele", "instance": "x"}
        series += [
            _series(ratio.name, labels, value),
            _series(catalog["seed_gradient_exploding"].name, labels, exploding),
            _series(catalog["seed_gradient_vanishing"].name, labels, vanishing),
        ]
        codes, index = levels.flag_codes(ratio), ratio.levels.index(level)
        code = (
            codes["seed_gradient_exploding"]
            if exploding
            else codes["seed_gradient_vanishing"]
            if vanishing
            else levels.seed_level_codes(ratio).get(index, value)
        )
        expected = show(ratio, value)
        mapped = grafana_mapping(mappings, code)
        if mapped is None:
            text = unit.removeprefix("prefix:") + f"{code:.{defaults['decimals']}f}"
            colour = grafana_colour(override(table, "Gradient", "thresholds")["steps"], code)
        else:
            text, colour = mapped["text"], mapped["color"]
        assert (text, colour) == (expected.label, catalog.colour(expected.status)), value
        samples.append(
            {
                "labels": "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}",
                "value": code,
            }
        )
    _promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [{"expr": expr, "eval_time": "0m", "exp_samples": samples}],
            }
        ],
    )
