"""The Grafana alerting provisioning: fresh, typed by Grafana's SDK, and in step with the Prometheus rules.

The drift check compares the committed files with each other (prometheus/rules/*.yml
against grafana/provisioning/alerting/), and promtool evaluates every Grafana
rule's query beside the Prometheus rule engine's ALERTS on the boundary series of
tests/prometheus/cases: both must select the same series at every evaluation.
"""

from __future__ import annotations

import copy
import enum
import math
import re
import subprocess
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.models import alerting

from tele_exporter import cli, generate
from tele_exporter.catalog import default_catalog, duration_seconds
from tele_exporter.generate import grafana_alerts, rules
from tests.support.servers import AMTOOL, PROMTOOL, binary

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
CASES = ROOT / "tests" / "prometheus" / "cases"
# Alertmanager's labels on ALERTS that the rule's own series do not carry.
ALERT_LABELS = "alertname, alertstate, severity"

plugins.register_default_plugins()


def load(path: Path | str) -> Any:
    return yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))


def prometheus_alerts() -> list[dict[str, Any]]:
    """Every alerting rule in the committed prometheus/rules/*.yml."""
    return [r for path in RULE_FILES for g in load(path)["groups"] for r in g["rules"] if "alert" in r]


def grafana_rules(doc: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every rule of the committed (or given) Grafana rules file."""
    doc = doc if doc is not None else load(grafana_alerts.RULES_PATH)
    return [r for group in doc["groups"] for r in group["rules"]]


def query_of(rule: dict[str, Any]) -> dict[str, Any]:
    """The Prometheus query node of a Grafana rule."""
    (node,) = [q for q in rule["data"] if q["refId"] == grafana_alerts.QUERY]
    return dict(node)


def as_prometheus(rule: dict[str, Any]) -> dict[str, Any]:
    """What a Grafana rule says in Prometheus's words: alert, expr, for, labels, annotations."""
    notes = dict(rule["annotations"])
    notes["description"] = notes["description"].replace(grafana_alerts.VALUE, rules.VALUE)
    # Grafana's templates cannot query: its NaN alert says where the provenance is instead of quoting it.
    catalog = default_catalog()
    (window,) = {a.window for spec in catalog for a in spec.alerts if a.kind == "increase"}
    notes["description"] = notes["description"].replace(
        rules.grafana_provenance(catalog), rules.provenance(catalog, window)
    )
    return {
        "alert": rule["title"],
        "expr": query_of(rule)["model"]["expr"],
        "for": rule["for"],
        "labels": rule["labels"],
        "annotations": notes,
    }


def drift(prom: list[dict[str, Any]], grafana: list[dict[str, Any]]) -> list[str]:
    """Differences between the Prometheus alert rules and the Grafana rules, by (alert, severity)."""
    left = {(r["alert"], r["labels"]["severity"]): r for r in prom}
    right = {(r["title"], r["labels"]["severity"]): as_prometheus(r) for r in grafana}
    out = [f"{key}: no Grafana rule" for key in left.keys() - right.keys()]
    out += [f"{key}: no Prometheus rule" for key in right.keys() - left.keys()]
    for key in left.keys() & right.keys():
        for field in ("expr", "for", "labels", "annotations"):
            if left[key][field] != right[key][field]:
                out.append(f"{key}: {field} {left[key][field]!r} != {right[key][field]!r}")
    if len(prom) != len(left) or len(grafana) != len(right):
        out.append("two rules share an alert name and severity")
    return sorted(out)


def test_generated_files_are_fresh() -> None:
    produced = grafana_alerts.files(default_catalog())
    assert set(produced) == {grafana_alerts.RULES_PATH, grafana_alerts.NOTIFICATIONS_PATH}
    for path, text in produced.items():
        assert (ROOT / path).read_text(encoding="utf-8") == text, f"{path} is stale: run tele-exporter generate"


def test_generate_check_fails_on_stale_provisioning(tmp_path: Path) -> None:
    generate.write(tmp_path, default_catalog())
    assert cli.main(["generate", "--check", "--root", str(tmp_path)]) == 0
    stale = tmp_path / grafana_alerts.RULES_PATH
    stale.write_text(stale.read_text(encoding="utf-8").replace("for: 5m", "for: 6m", 1), encoding="utf-8")
    assert cli.main(["generate", "--check", "--root", str(tmp_path)]) == 1


def test_every_prometheus_alert_has_a_grafana_rule_and_back() -> None:
    prom, grafana = prometheus_alerts(), grafana_rules()
    assert len(prom) == len(grafana) >= 11
    assert drift(prom, grafana) == []


def _kl_warning(doc: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in grafana_rules(doc) if r["title"] == "TeleKLDivergenceHigh" and "warning" in r["uid"])


def _one_float_above(doc: dict[str, Any]) -> None:
    query = query_of(_kl_warning(doc))["model"]
    query["expr"] = query["expr"].replace("< 0.03", f"< {math.nextafter(0.03, math.inf)!r}")


def _open_lower_end(doc: dict[str, Any]) -> None:
    query = query_of(_kl_warning(doc))["model"]
    query["expr"] = query["expr"].replace(">= 0.015", "> 0.015")


def _longer_for(doc: dict[str, Any]) -> None:
    _kl_warning(doc)["for"] = "3m"


def _other_severity(doc: dict[str, Any]) -> None:
    _kl_warning(doc)["labels"]["severity"] = "critical"


def _other_runbook(doc: dict[str, Any]) -> None:
    _kl_warning(doc)["annotations"]["runbook_url"] += "-x"


def _missing_rule(doc: dict[str, Any]) -> None:
    doc["groups"][0]["rules"].remove(_kl_warning(doc))


def _extra_rule(doc: dict[str, Any]) -> None:
    extra = copy.deepcopy(_kl_warning(doc))
    extra["title"] = "TeleSomethingElse"
    doc["groups"][0]["rules"].append(extra)


MUTATIONS = {
    "one float above the boundary": _one_float_above,
    "open lower end": _open_lower_end,
    "longer for": _longer_for,
    "other severity": _other_severity,
    "other runbook": _other_runbook,
    "missing rule": _missing_rule,
    "extra rule": _extra_rule,
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_drift_is_caught(mutation: str) -> None:
    doc = load(grafana_alerts.RULES_PATH)
    MUTATIONS[mutation](doc)
    assert drift(prometheus_alerts(), grafana_rules(doc))


def test_rules_fire_on_every_returned_series() -> None:
    """Grafana's importer pipeline: instant PromQL, 1 for every sample (NaN, ±Inf, 0), threshold > 0."""
    datasources = load("grafana/provisioning/datasources/datasources.yml")["datasources"]
    prometheus_uids = {d["uid"] for d in datasources if d["type"] == "prometheus"}
    assert grafana_alerts.DATASOURCE_UID in prometheus_uids
    for rule in grafana_rules():
        nodes = {q["refId"]: q for q in rule["data"]}
        assert rule["condition"] == "threshold" and set(nodes) == {"query", "prometheus_math", "threshold"}
        query = nodes["query"]
        assert query["datasourceUid"] == grafana_alerts.DATASOURCE_UID
        assert query["model"]["instant"] is True and query["model"]["range"] is False
        assert (
            nodes["prometheus_math"]["model"]["expression"] == "is_number($query) || is_nan($query) || is_inf($query)"
        )
        threshold = nodes["threshold"]["model"]
        assert threshold["expression"] == "prometheus_math"
        assert threshold["conditions"] == [{"evaluator": {"params": [0], "type": "gt"}}]
        assert rule["noDataState"] == "OK"
        assert grafana_alerts.VALUE in rule["annotations"]["description"]


def test_rule_uids_are_valid_for_grafana() -> None:
    uids = [r["uid"] for r in grafana_rules()]
    assert len(set(uids)) == len(uids)
    for uid in uids:
        assert len(uid) <= 40 and uid.replace("-", "").replace("_", "").isalnum(), uid
    long = rules.AlertRule("TeleA" + "x" * 60, "critical", "up", "1m", "", "", next(iter(default_catalog())))
    assert len(grafana_alerts.rule_uid(long)) == 40
    assert grafana_alerts.rule_uid(long) != grafana_alerts.rule_uid(rules.AlertRule(**{**vars(long), "name": "TeleB"}))


def test_evaluation_interval_divides_every_for() -> None:
    """Grafana's 10s interval: each for: is a whole number of evaluations, as in Prometheus."""
    step = duration_seconds(grafana_alerts.INTERVAL)
    assert step == 10
    for rule in grafana_rules():
        assert duration_seconds(rule["for"]) % step == 0, rule["uid"]


# --- Grafana's own types: the grafana-foundation-sdk alerting models -------------------------------


def model_errors(obj: Any, where: str) -> list[str]:
    """Fields of an SDK model whose values do not have the field's annotated type, recursively."""
    out = []
    for name, hint in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name, None)
        if value is not None:
            out += type_errors(value, hint, f"{where}.{name}")
    return out


def type_errors(value: Any, hint: Any, where: str) -> list[str]:
    """Why `value` is not of the annotated type `hint` (Literal, enum, scalar, list, dict, SDK model)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [type_errors(value, arg, where) for arg in args if arg is not type(None)]
        return [] if any(not errors for errors in options) else options[0]
    if origin is typing.Literal:
        return [] if value in args else [f"{where}: {value!r} is not one of {args}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not a list"]
        return [e for i, item in enumerate(value) for e in type_errors(item, args[0], f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is not an object"]
        return [e for key, item in value.items() for e in type_errors(item, args[1], f"{where}.{key}")]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return [] if value in {m.value for m in hint} else [f"{where}: {value!r} is not a {hint.__name__}"]
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return [] if ok else [f"{where}: {value!r} is not a number"]
    if hint in (bool, str) or (hint is int and not isinstance(value, bool)):
        return [] if isinstance(value, hint) else [f"{where}: {value!r} is not a {hint.__name__}"]
    if hint is int:
        return [f"{where}: {value!r} is not an int"]
    if hasattr(value, "to_json"):
        return model_errors(value, where)
    return []


def sdk_errors(model: type[Any], data: dict[str, Any]) -> list[str]:
    """Why `data` is not a valid `model`: keys the model does not know, or values not of their field's type."""
    obj = model.from_json(data)
    errors = model_errors(obj, model.__name__)
    if grafana_alerts.plain(obj) != data:
        errors.append(f"{model.__name__}: keys or shapes the SDK does not know: {data}")
    return errors


def file_objects(rules_doc: dict[str, Any], notes_doc: dict[str, Any]) -> list[tuple[type[Any], dict[str, Any]]]:
    """Each object of the provisioning files as the SDK model and JSON the Grafana API would take."""
    out: list[tuple[type[Any], dict[str, Any]]] = []
    for group in rules_doc["groups"]:
        extra = {"folderUID": "", "orgID": group["orgId"], "ruleGroup": group["name"]}
        out += [(alerting.Rule, {**rule, **extra}) for rule in group["rules"]]
    for point in notes_doc["contactPoints"]:
        out += [(alerting.ContactPoint, {**receiver, "name": point["name"]}) for receiver in point["receivers"]]
    for tree in notes_doc["policies"]:
        out.append((alerting.NotificationPolicy, {k: v for k, v in tree.items() if k != "orgId"}))
    return out


def test_files_are_valid_sdk_alerting_models() -> None:
    rules_doc, notes_doc = load(grafana_alerts.RULES_PATH), load(grafana_alerts.NOTIFICATIONS_PATH)
    assert rules_doc["apiVersion"] == notes_doc["apiVersion"] == 1
    objects = file_objects(rules_doc, notes_doc)
    assert len(objects) == len(grafana_rules()) + 2 + 1
    for model, data in objects:
        assert sdk_errors(model, data) == []


def test_query_models_decode_as_their_sdk_types() -> None:
    rule = alerting.Rule.from_json({**grafana_rules()[0], "folderUID": "", "orgID": 1, "ruleGroup": "g"})
    names = [type(query.model).__name__ for query in rule.data]
    assert names == ["Dataquery", "TypeMath", "TypeThreshold"]


BROKEN: dict[str, tuple[type[Any], Callable[[dict[str, Any]], object]]] = {
    "misspelled noDataState key": (alerting.Rule, lambda d: d.update(noDatastate=d.pop("noDataState"))),
    "noDataState Ok": (alerting.Rule, lambda d: d.update(noDataState="Ok")),
    "execErrState Firing": (alerting.Rule, lambda d: d.update(execErrState="Firing")),
    "evaluator above": (
        alerting.Rule,
        lambda d: d["data"][2]["model"]["conditions"][0]["evaluator"].update(type="above"),
    ),
    "query instant as text": (alerting.Rule, lambda d: d["data"][0]["model"].update(instant="true")),
    "math expr key": (
        alerting.Rule,
        lambda d: d["data"][1]["model"].update(expr=d["data"][1]["model"].pop("expression")),
    ),
    "contact point type webhooks": (alerting.ContactPoint, lambda d: d.update(type="webhooks")),
    "policy groupBy": (alerting.NotificationPolicy, lambda d: d.update(groupBy=d.pop("group_by"))),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_broken_objects_fail_the_sdk_check(broken: str) -> None:
    model, mutate = BROKEN[broken]
    objects = file_objects(load(grafana_alerts.RULES_PATH), load(grafana_alerts.NOTIFICATIONS_PATH))
    data = copy.deepcopy(next(d for m, d in objects if m is model))
    mutate(data)
    try:
        errors = sdk_errors(model, data)
    except (KeyError, TypeError, ValueError) as error:
        errors = [repr(error)]
    assert errors, f"the SDK check accepted a {broken}"


# Keys of Grafana's file provisioning types (pkg/services/provisioning/alerting/: AlertRuleGroupV1,
# AlertRuleV1 and QueryV1 in rules_types.go, ContactPointV1 and ReceiverV1 in contact_point_types.go).
GROUP_KEYS = {"orgId", "name", "folder", "interval", "rules"}
RULE_KEYS = {
    "uid", "title", "condition", "data", "dasboardUid", "dashboardUid", "panelId", "noDataState", "execErrState",
    "for", "keepFiringFor", "missing_series_evals_to_resolve", "annotations", "labels", "isPaused",
    "notification_settings", "record",
}  # fmt: skip
QUERY_KEYS = {"refId", "queryType", "relativeTimeRange", "datasourceUid", "model"}
CONTACT_POINT_KEYS = {"orgId", "name", "receivers"}
RECEIVER_KEYS = {"uid", "type", "settings", "disableResolveMessage"}


def test_files_use_grafanas_provisioning_keys() -> None:
    rules_doc, notes_doc = load(grafana_alerts.RULES_PATH), load(grafana_alerts.NOTIFICATIONS_PATH)
    assert set(rules_doc) == {"apiVersion", "groups"} and set(notes_doc) == {"apiVersion", "contactPoints", "policies"}
    for group in rules_doc["groups"]:
        assert set(group) == GROUP_KEYS
        for rule in group["rules"]:
            assert set(rule) <= RULE_KEYS, rule["uid"]
            assert all(set(query) <= QUERY_KEYS for query in rule["data"]), rule["uid"]
    for point in notes_doc["contactPoints"]:
        assert set(point) == CONTACT_POINT_KEYS
        assert all(set(receiver) <= RECEIVER_KEYS for receiver in point["receivers"])


def _strings(data: Any, skip: tuple[str, ...]) -> list[str]:
    """Every string in `data`, leaving out the values of keys in `skip`."""
    if isinstance(data, dict):
        return [s for key, value in data.items() if key not in skip for s in _strings(value, skip)]
    if isinstance(data, list):
        return [s for item in data for s in _strings(item, skip)]
    return [data] if isinstance(data, str) else []


def test_grafanas_env_interpolation_changes_nothing() -> None:
    """Grafana runs os.ExpandEnv over provisioning strings, except query models and annotations.

    Annotations are read raw since Grafana 9.1 (newer versions expand only ${VAR}), so their
    {{ $labels.x }} survive; everywhere else a "$" would be replaced by an environment variable.
    """
    docs = [load(grafana_alerts.RULES_PATH), load(grafana_alerts.NOTIFICATIONS_PATH)]
    for text in (s for doc in docs for s in _strings(doc, skip=("model", "annotations"))):
        assert "$" not in text, text
    for rule in grafana_rules():
        assert all("${" not in text for text in rule["annotations"].values()), rule["uid"]


# --- routing: the notification policy against prometheus/alertmanager.yml -------------------------


def _matchers(route: dict[str, Any]) -> list[list[str]]:
    out = []
    for text in route.get("matchers", []):
        name, op, value = (part.strip().strip('"') for part in text.partition("="))
        out.append([name, op, value])
    return out


def test_policy_routes_like_alertmanager() -> None:
    am = load("prometheus/alertmanager.yml")
    notes = load(grafana_alerts.NOTIFICATIONS_PATH)
    (tree,) = notes["policies"]
    for key in ("receiver", "group_by", "group_wait", "group_interval", "repeat_interval"):
        assert tree[key] == am["route"][key], key
    assert len(tree["routes"]) == len(am["route"]["routes"])
    for ours, theirs in zip(tree["routes"], am["route"]["routes"], strict=True):
        assert ours["object_matchers"] == _matchers(theirs)
        assert {k: v for k, v in ours.items() if k != "object_matchers"} == {
            k: v for k, v in theirs.items() if k != "matchers"
        }
    receivers = {r["name"]: r["webhook_configs"][0] for r in am["receivers"]}
    points = {p["name"]: p["receivers"][0] for p in notes["contactPoints"]}
    assert set(points) == set(receivers)
    for name, point in points.items():
        assert point["type"] == "webhook" and point["settings"]["url"] == receivers[name]["url"]
        assert point["disableResolveMessage"] is (not receivers[name]["send_resolved"])


def test_every_severity_has_a_route_and_a_contact_point() -> None:
    notes = load(grafana_alerts.NOTIFICATIONS_PATH)
    routed = {route["object_matchers"][0][2]: route["receiver"] for route in notes["policies"][0]["routes"]}
    severities = {r["labels"]["severity"] for r in grafana_rules()}
    assert severities <= set(routed)
    assert set(routed.values()) <= {p["name"] for p in notes["contactPoints"]}


def as_alertmanager(notes: dict[str, Any]) -> dict[str, Any]:
    """The Grafana policy and contact points as an Alertmanager config (object_matchers as matcher strings)."""

    def route(node: dict[str, Any]) -> dict[str, Any]:
        out = {key: value for key, value in node.items() if key not in ("orgId", "object_matchers", "routes")}
        if "object_matchers" in node:
            out["matchers"] = [f'{name}{op}"{value}"' for name, op, value in node["object_matchers"]]
        if "routes" in node:
            out["routes"] = [route(child) for child in node["routes"]]
        return out

    receivers = [
        {"name": p["name"], "webhook_configs": [{"url": r["settings"]["url"]}]}
        for p in notes["contactPoints"]
        for r in p["receivers"]
    ]
    (tree,) = notes["policies"]
    return {"route": route(tree), "receivers": receivers}


@pytest.mark.servers
def test_alertmanager_routes_each_severity_to_the_same_receiver(tmp_path: Path) -> None:
    """Alertmanager's own routing (amtool) sends each label set to the same receiver under both policies."""
    converted = tmp_path / "grafana-policy.yml"
    converted.write_text(yaml.safe_dump(as_alertmanager(load(grafana_alerts.NOTIFICATIONS_PATH))), encoding="utf-8")
    check = subprocess.run([binary(AMTOOL), "check-config", str(converted)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

    def receiver(config: Path, labels: list[str]) -> str:
        argv = [binary(AMTOOL), "config", "routes", "test", f"--config.file={config}", *labels]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.strip()

    base = ["alertname=TeleKLDivergenceHigh", "job=tele", "instance=t"]
    for severity in ("critical", "warning", None):
        labels = base + ([f"severity={severity}"] if severity else [])
        ours, theirs = receiver(converted, labels), receiver(ROOT / "prometheus" / "alertmanager.yml", labels)
        assert ours == theirs == (f"tele-{severity}" if severity else "tele-warning"), (severity, ours, theirs)


# --- evaluation: each Grafana query against the Prometheus rule engine, in promtool ----------------


def promtool_seconds(text: str) -> float:
    """Seconds in a compound Prometheus duration such as '1m30s'."""
    parts = re.findall(r"(\d+)(ms|[smhd])", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"{text!r} is not a duration"
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(n) * unit[u] for n, u in parts)


def _grid(test: dict[str, Any], step_s: float) -> list[str]:
    """Every rule evaluation time up to the test's last eval_time, as promtool durations."""
    checks = [c for key in ("alert_rule_test", "promql_expr_test") for c in test.get(key, [])]
    times = [promtool_seconds(c["eval_time"]) for c in checks]
    last = max(times, default=0.0)
    return [f"{round(i * step_s)}s" for i in range(int(last // step_s) + 1)]


def _reading(grafana: list[dict[str, Any]], test: dict[str, Any]) -> list[dict[str, Any]]:
    """The rules whose query reads a series of the test (or uses absent()): the others select nothing on both sides."""
    names = {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s["series"]).group(0) for s in test["input_series"]}  # type: ignore[union-attr]
    return [
        rule
        for rule in grafana
        if "absent(" in (expr := query_of(rule)["model"]["expr"])
        or any(re.search(rf"\b{re.escape(name)}\b", expr) for name in names)
    ]


def same_series_tests(grafana: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """promtool test files, one per case file: each Grafana query and ALERTS select the same series.

    ALERTS carries the rule's labels plus alertname, alertstate (pending or firing)
    and severity; `unless ignoring(...)` both ways is empty exactly when the sets agree.
    """
    out = {}
    for case_path in sorted(CASES.glob("*.yml")):
        case = yaml.safe_load(case_path.read_text(encoding="utf-8"))
        step = promtool_seconds(case.get("evaluation_interval", "1m"))
        tests = []
        for test in case["tests"]:
            checks = []
            relevant = _reading(grafana, test)
            for at in _grid(test, step):
                for rule in relevant:
                    query = query_of(rule)["model"]["expr"]
                    alerts = f'ALERTS{{alertname="{rule["title"]}", severity="{rule["labels"]["severity"]}"}}'
                    for expr in (
                        f"({query}) unless ignoring({ALERT_LABELS}) {alerts}",
                        f"{alerts} unless ignoring({ALERT_LABELS}) ({query})",
                    ):
                        checks.append({"expr": expr, "eval_time": at, "exp_samples": []})
            tests.append(
                {
                    "name": test.get("name", ""),
                    "interval": test.get("interval", "1m"),
                    "input_series": test["input_series"],
                    "promql_expr_test": checks,
                }
            )
        out[case_path.name] = {
            "rule_files": [str(path) for path in RULE_FILES],
            "evaluation_interval": case.get("evaluation_interval", "1m"),
            "tests": tests,
        }
    return out


def run_promtool(files: dict[str, dict[str, Any]], work: Path) -> subprocess.CompletedProcess[str]:
    paths = []
    for name, content in files.items():
        path = work / name
        path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
        paths.append(str(path))
    return subprocess.run([binary(PROMTOOL), "test", "rules", *paths], capture_output=True, text=True, timeout=900)


def test_cases_fire_every_alert() -> None:
    """The cases make each (alert, severity) fire somewhere, so the comparison below is never vacuous."""
    fired = set()
    for case_path in CASES.glob("*.yml"):
        for test in yaml.safe_load(case_path.read_text(encoding="utf-8"))["tests"]:
            for check in test.get("alert_rule_test", []):
                fired |= {(check["alertname"], a["exp_labels"]["severity"]) for a in check.get("exp_alerts") or []}
    assert {(r["title"], r["labels"]["severity"]) for r in grafana_rules()} <= fired


@pytest.mark.servers
def test_grafana_queries_select_the_series_prometheus_alerts_on(tmp_path: Path) -> None:
    result = run_promtool(same_series_tests(grafana_rules()), tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.mark.servers
@pytest.mark.parametrize("mutation", ["one float above the boundary", "open lower end"])
def test_promtool_catches_a_query_off_the_boundary(mutation: str, tmp_path: Path) -> None:
    doc = load(grafana_alerts.RULES_PATH)
    MUTATIONS[mutation](doc)
    case = "kl_divergence.yml"
    result = run_promtool({case: same_series_tests(grafana_rules(doc))[case]}, tmp_path)
    assert result.returncode != 0, f"promtool accepted a Grafana query with {mutation}"
