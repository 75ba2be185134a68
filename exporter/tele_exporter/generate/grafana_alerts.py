"""Grafana Alerting file provisioning, derived from the catalog through the Prometheus alert rules.

Writes grafana/provisioning/alerting/: one Grafana-managed rule per rule of
generate/rules.py, and a contact point per severity with a notification policy
that routes by severity like prometheus/alertmanager.yml. Each rule runs the way
Grafana's own Prometheus-rule importer runs one: the rule's PromQL as an instant
query, a math expression that turns every returned sample (0, NaN and ±Inf
included) into 1, and a threshold "> 0" on that, so at one instant a Grafana rule
selects exactly the series its Prometheus rule selects. The objects are the
grafana-foundation-sdk's alerting models, laid out as Grafana's provisioning files.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

try:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import alerting, expr, prometheus
    from grafana_foundation_sdk.models.dashboard import DataSourceRef
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "tele-exporter generate writes grafana/provisioning/alerting with grafana-foundation-sdk, the "
        "`grafana` extra: in a checkout, run `make generate`, or `pip install -e '.[grafana]'` (Python 3.11)"
    ) from error

from ..catalog.model import SEVERITIES, Catalog
from . import rules

RULES_PATH = "grafana/provisioning/alerting/tele-alert-rules.yml"
NOTIFICATIONS_PATH = "grafana/provisioning/alerting/tele-notifications.yml"
# The Prometheus data source of grafana/provisioning/datasources/datasources.yml.
DATASOURCE_UID = "tele-prometheus"
EXPRESSION = DataSourceRef(type_val="__expr__", uid="__expr__")
ORG_ID = 1
# A folder of its own: the dashboards' provider owns "TELE" (uid tele).
FOLDER = "TELE alerts"
# Grafana's default smallest evaluation interval (min_interval); Prometheus evaluates every 5s.
INTERVAL = "10s"
# How far back the instant query may look, as Grafana's importer sets it.
LOOKBACK_S = 600
# The refIds of Grafana's Prometheus-rule importer.
QUERY, MATH, THRESHOLD = "query", "prometheus_math", "threshold"
# Grafana's templates know the query's value as $values.<refId>.Value, not $value.
VALUE = '{{ $values.query.Value | printf "%.4g" }}'
# Grafana's rule uids are at most 40 characters of [a-zA-Z0-9_-].
UID_MAX = 40
# Notification timing and grouping of prometheus/alertmanager.yml.
GROUP_BY = ["alertname", "job", "instance"]
GROUP_WAIT, GROUP_INTERVAL, REPEAT_INTERVAL = "10s", "1m", "4h"
REPEAT_CRITICAL = "1h"
# Placeholder receiver, as in prometheus/alertmanager.yml; docs/alerting.md shows real ones.
WEBHOOK_URL = "http://127.0.0.1:5001/"
# Fields of the API's rule that the provisioning file sets once per group instead.
GROUP_FIELDS = ("folderUID", "orgID", "ruleGroup")
RECEIVER_ORDER = ("uid", "type", "settings", "disableResolveMessage")
RULE_ORDER = ("uid", "title", "condition", "for", "labels", "annotations", "noDataState", "execErrState", "data")


def rule_uid(rule: rules.AlertRule) -> str:
    """A stable uid from the alert's name and severity, hashed down when too long for Grafana."""
    uid = f"{rule.name}-{rule.severity}".lower()
    if len(uid) <= UID_MAX:
        return uid
    digest = hashlib.sha256(uid.encode()).hexdigest()[:8]
    return f"{uid[: UID_MAX - len(digest) - 1]}-{digest}"


def grafana_rule(catalog: Catalog, rule: rules.AlertRule) -> alerting.Rule:
    """One Prometheus alert rule as a Grafana-managed rule with the same condition, for and annotations."""
    notes = rules.alert_annotations(catalog, rule)
    notes["description"] = notes["description"].replace(rules.VALUE, VALUE)
    for window in {a.window for spec in catalog for a in spec.alerts if a.kind == "increase"}:
        notes["description"] = notes["description"].replace(
            rules.provenance(catalog, window), rules.grafana_provenance(catalog)
        )
    query = prometheus.Dataquery(
        expr=rule.expr,
        instant=True,
        range_val=False,
        ref_id=QUERY,
        datasource=DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID),
    )
    every = expr.TypeMath(
        expression=f"is_number(${QUERY}) || is_nan(${QUERY}) || is_inf(${QUERY})", ref_id=MATH, datasource=EXPRESSION
    )
    above = expr.ExprTypeThresholdConditionsEvaluator(type_val="gt", params=[0])
    threshold = expr.TypeThreshold(
        expression=MATH,
        conditions=[expr.ExprTypeThresholdConditions(evaluator=above)],
        ref_id=THRESHOLD,
        datasource=EXPRESSION,
    )
    return alerting.Rule(
        uid=rule_uid(rule),
        title=rule.name,
        condition=THRESHOLD,
        data=[
            alerting.Query(
                ref_id=QUERY,
                datasource_uid=DATASOURCE_UID,
                relative_time_range=alerting.RelativeTimeRange(from_val=LOOKBACK_S, to=0),
                model=query,
            ),
            alerting.Query(ref_id=MATH, datasource_uid="__expr__", model=every),
            alerting.Query(ref_id=THRESHOLD, datasource_uid="__expr__", model=threshold),
        ],
        for_val=rule.for_,
        labels={"severity": rule.severity},
        annotations=notes,
        # Like Prometheus: no series is no alert; a failing query shows as an error.
        no_data_state="OK",
        exec_err_state="Error",
        org_id=ORG_ID,
        rule_group=f"{catalog.namespace}.alerts",
        folder_uid="",
    )


def grafana_rules(catalog: Catalog) -> list[alerting.Rule]:
    """Every Grafana-managed rule, in the order of the Prometheus alert rules."""
    out = [grafana_rule(catalog, rule) for rule in rules.alert_rules(catalog)]
    uids = [rule.uid for rule in out]
    duplicates = sorted({uid for uid in uids if uids.count(uid) > 1 and uid})
    if duplicates:
        raise ValueError(f"two alert rules share the Grafana uid {', '.join(duplicates)}")
    return out


def contact_points(catalog: Catalog) -> list[alerting.ContactPoint]:
    """One webhook contact point per severity, named like prometheus/alertmanager.yml's receivers."""
    return [
        alerting.ContactPoint(
            uid=f"{catalog.namespace}-{severity}",
            name=f"{catalog.namespace}-{severity}",
            type_val="webhook",
            settings={"url": WEBHOOK_URL, "httpMethod": "POST"},
            disable_resolve_message=False,
        )
        for severity in SEVERITIES
    ]


def policy(catalog: Catalog) -> alerting.NotificationPolicy:
    """The notification policy tree: warnings by default, one route per severity."""
    routes = []
    for severity in reversed(SEVERITIES):  # critical first, as in alertmanager.yml
        route = alerting.NotificationPolicy(
            receiver=f"{catalog.namespace}-{severity}", object_matchers=[["severity", "=", severity]]
        )
        if severity == "critical":
            route.group_wait = GROUP_WAIT
            route.repeat_interval = REPEAT_CRITICAL
        routes.append(route)
    return alerting.NotificationPolicy(
        receiver=f"{catalog.namespace}-warning",
        group_by=GROUP_BY,
        group_wait=GROUP_WAIT,
        group_interval=GROUP_INTERVAL,
        repeat_interval=REPEAT_INTERVAL,
        routes=routes,
    )


def plain(model: Any) -> Any:
    """An SDK object as the JSON data Grafana reads (the SDK's own encoder)."""
    return json.loads(json.dumps(model, cls=JSONEncoder))


def rule_entry(rule: alerting.Rule) -> dict[str, Any]:
    """A rule as a provisioning file lists it: the API's rule without the group's fields."""
    data = {key: value for key, value in plain(rule).items() if key not in GROUP_FIELDS}
    return {key: data[key] for key in RULE_ORDER if key in data} | data


def rules_file(catalog: Catalog) -> dict[str, Any]:
    """grafana/provisioning/alerting/tele-alert-rules.yml as data."""
    group = {
        "orgId": ORG_ID,
        "name": f"{catalog.namespace}.alerts",
        "folder": FOLDER,
        "interval": INTERVAL,
        "rules": [rule_entry(rule) for rule in grafana_rules(catalog)],
    }
    return {"apiVersion": 1, "groups": [group]}


def notifications_file(catalog: Catalog) -> dict[str, Any]:
    """grafana/provisioning/alerting/tele-notifications.yml as data: contact points and the policy."""
    points = []
    for point in contact_points(catalog):
        receiver = {key: value for key, value in plain(point).items() if key != "name"}
        receiver = {key: receiver[key] for key in RECEIVER_ORDER if key in receiver} | receiver
        points.append({"orgId": ORG_ID, "name": point.name, "receivers": [receiver]})
    return {"apiVersion": 1, "contactPoints": points, "policies": [{"orgId": ORG_ID, **plain(policy(catalog))}]}


def files(catalog: Catalog) -> dict[str, str]:
    """The two provisioning files, by path relative to the repository root."""
    return {RULES_PATH: rules.dump(rules_file(catalog)), NOTIFICATIONS_PATH: rules.dump(notifications_file(catalog))}
