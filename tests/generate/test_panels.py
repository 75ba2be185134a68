"""The panel primitives build the JSON Grafana reads, field for field."""

from __future__ import annotations

from tele_exporter.generate import panels


def test_named_adds_the_run_and_rank_text_the_legend_reads() -> None:
    """The legend names the run (its `run` label, else its instance, never only a port) and the rank where set."""
    source = 'label_replace(up, "run_text", "$1", "instance", "(.*)")'
    run = f'label_replace({source}, "run_text", "$1", "run", "(.+)")'
    assert panels.named("up") == f'label_replace({run}, "rank_text", " rank $1", "rank", "(.+)")'
    assert panels.LEGEND == "{{run_text}}{{rank_text}}"


def test_target_is_a_code_mode_range_query_on_the_chosen_data_source() -> None:
    assert panels.target("up", "B", "{{job}}", interval="1m") == {
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "editorMode": "code",
        "expr": "up",
        "legendFormat": "{{job}}",
        "range": True,
        "refId": "B",
        "interval": "1m",
    }


def test_instant_target_is_one_row_per_source_and_label() -> None:
    target = panels.instant("tele_x", "C", ["env", "slot"])
    assert target["expr"] == "max by (job, run, instance, rank, env, slot) (tele_x)"
    assert (target["format"], target["instant"], target["range"], target["refId"]) == ("table", True, False, "C")


def test_table_merges_its_columns_under_their_headers() -> None:
    table = panels.table(
        "Seeds",
        "Which seeds?",
        {"Ratio": ("tele_ratio", {}), "Gain": ("tele_gain", {"decimals": 0})},
        labels=["env"],
        defaults={"unit": "none"},
    )
    assert [(t["refId"], t["expr"]) for t in table["targets"]] == [
        ("A", "max by (job, run, instance, rank, env) (tele_ratio)"),
        ("B", "max by (job, run, instance, rank, env) (tele_gain)"),
    ]
    merge, organize = table["transformations"]
    assert merge == {"id": "merge", "options": {}}
    assert organize["options"]["renameByName"] == {
        "run": "Run",
        "instance": "Instance",
        "rank": "Rank",
        "env": "Env",
        "Value #A": "Ratio",
        "Value #B": "Gain",
    }
    assert organize["options"]["indexByName"] == {
        "run": 0,
        "instance": 1,
        "rank": 2,
        "env": 3,
        "Value #A": 4,
        "Value #B": 5,
    }
    text = [{"id": "unit", "value": "string"}, {"id": "custom.cellOptions", "value": {"type": "auto"}}]
    assert table["fieldConfig"]["overrides"] == [
        {"matcher": {"id": "byName", "options": "Run"}, "properties": text},
        {"matcher": {"id": "byName", "options": "Instance"}, "properties": text},
        {"matcher": {"id": "byName", "options": "Rank"}, "properties": text},
        {"matcher": {"id": "byName", "options": "Env"}, "properties": text},
        {"matcher": {"id": "byName", "options": "Gain"}, "properties": [{"id": "decimals", "value": 0}]},
    ]
    assert table["fieldConfig"]["defaults"]["unit"] == "none"
    assert table["options"]["sortBy"] == [{"desc": False, "displayName": "Env"}]


def test_a_table_without_labels_sorts_by_instance() -> None:
    table = panels.table("Runs", "", {"KL": ("tele_kl", {})}, labels=[], defaults={})
    assert table["options"]["sortBy"] == [{"desc": False, "displayName": "Instance"}]


def test_fixed_paints_one_query_and_adds_properties() -> None:
    assert panels.fixed("warning", "yellow", **{"custom.lineWidth": 1}) == {
        "matcher": {"id": "byFrameRefID", "options": "warning"},
        "properties": [
            {"id": "color", "value": {"mode": "fixed", "fixedColor": "yellow"}},
            {"id": "custom.lineWidth", "value": 1},
        ],
    }


def test_stat_colours_by_its_steps() -> None:
    steps = [{"color": "green", "value": None}, {"color": "red", "value": 1}]
    stat = panels.stat("Errors", "How many?", [], decimals=0, mappings=[], steps=steps, unit="none", graph=False)
    assert stat["fieldConfig"]["defaults"]["thresholds"] == {"mode": "absolute", "steps": steps}
    assert stat["fieldConfig"]["overrides"] == []
    assert (stat["options"]["graphMode"], stat["options"]["colorMode"]) == ("none", "value")


def test_row_is_an_expanded_heading() -> None:
    assert panels.row("Seeds") == {"collapsed": False, "panels": [], "title": "Seeds", "type": "row"}


def test_variables() -> None:
    source = panels.datasource_variable("tele-prometheus")
    assert (source["name"], source["current"]["value"], source["query"]) == (
        "datasource",
        "tele-prometheus",
        "prometheus",
    )
    instance = panels.query_variable("instance", "Instance", 'tele_updates_total{job=~"$job"}')
    assert instance["query"]["query"] == 'label_values(tele_updates_total{job=~"$job"}, instance)'
    assert (instance["allValue"], instance["includeAll"], instance["multi"]) == (".*", True, True)
