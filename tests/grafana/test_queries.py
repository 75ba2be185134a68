"""Every dashboard query returns data from a real Prometheus that scraped a demo run.

The demo trainer (`tele-exporter demo`) serves /metrics; Debian's Prometheus scrapes
it every second with the repo's rules. Then each panel target, with the template
variables substituted as Grafana would ("All" and each concrete value the
variable's own query offers), runs against Prometheus' HTTP API and must return
at least one series with samples (the Gaussian policy's std, none: the demo's policy is categorical).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tele_exporter.catalog import default_catalog
from tele_exporter.catalog.display import head_trend
from tele_exporter.generate import dashboards, levels
from tests.support.demo import start_demo
from tests.support.grafana import SCRAPE_S, grafana_escape, substitute
from tests.support.servers import Running, poll, prometheus_config, start_prometheus

pytestmark = [pytest.mark.slow, pytest.mark.servers]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / dashboards.PATH
MIN_UPDATES = 4
MIN_SCRAPES = 15
ALL = {"job": ".*", "run": ".*", "instance": ".*", "env": ".*"}
RUN = "demo"  # the `run` label the demo's scrape target carries
GAIN = default_catalog()["seed_backward_gain"].name
RATIO = default_catalog()["seed_grad_ratio"].name
STD = default_catalog()["policy_std"].name  # a Gaussian policy's std: the demo's categorical policy has none
FIRST = default_catalog()["nonfinite_first_step"].name
STATE = default_catalog()["head_gradient_state"].name
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<match>.+),\s*)?(?P<label>\w+)\)$")


@pytest.fixture(scope="module")
def demo() -> Iterator[str]:
    """A running demo trainer (until stopped); yields its host:port."""
    with start_demo("--seed", "7") as running:
        yield running.address


@dataclass(frozen=True)
class Scraped:
    """Prometheus holding the demo run: `start` of the run, `at` a time when seeds were live."""

    prom: Running
    start: float
    at: float


@pytest.fixture(scope="module")
def scraped(demo: str) -> Iterator[Scraped]:
    """Prometheus scraping the demo until it holds MIN_SCRAPES scrapes, MIN_UPDATES updates
    and live seeds."""
    catalog = default_catalog()
    rules = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
    start = time.time()
    config = yaml.safe_load(prometheus_config([demo], interval=f"{SCRAPE_S}s"))
    config["scrape_configs"][0]["static_configs"][0]["labels"] = {"run": RUN}  # as a file_sd target may carry it
    config = yaml.safe_dump(config, sort_keys=False)
    with start_prometheus(config, rule_files=rules) as prom:
        updates, seeds = catalog["ppo_updates"].name, catalog["seed_grad_ratio"].name

        def ready() -> float | None:
            # The demo grows and prunes seeds, so some instants have none: find one with a seed
            # that has had a pass with data (ratio > 0; before that its backward gain is missing).
            history = f"count_over_time({updates}[5m]) >= {MIN_SCRAPES}"
            if not prom.query(f"{updates} >= {MIN_UPDATES}") or not prom.query(history):
                return None
            at = prom.settled_at(1)  # no stale marker can land at `at` later: the panels' ranges end there
            if at is None:
                return None
            live = prom.api("/api/v1/query", query=f"count({seeds} > 0)", time=f"{at:.3f}")
            return at if live["data"]["result"] else None

        at = poll(ready, timeout=240, interval=0.5, what=f"{MIN_UPDATES} updates and live seeds")
        yield Scraped(prom, start, float(at))


def board() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def query_targets() -> list[tuple[str, dict[str, Any]]]:
    """(panel title/refId, target) for every PromQL target of the dashboard."""
    out = []
    for panel in board()["panels"]:
        if panel["type"] == "alertlist":
            # The alert list reads rules from the data source's ruler API; it has no PromQL.
            assert not panel.get("targets")
            continue
        for target in panel.get("targets", []):
            out.append((f"{panel['title']}/{target['refId']}", target))
    return out


def variable_values(run: Scraped, values: dict[str, str], instant: bool) -> dict[str, list[str]]:
    """Each label variable's options from its label_values() query, as Grafana lists them.

    For instant (table) targets only the values with a series at `run.at` are kept:
    a seed pruned earlier is offered by the variable but has no current value.
    """
    out: dict[str, list[str]] = {}
    for var in board()["templating"]["list"]:
        if var["type"] != "query":
            continue
        parsed = LABEL_VALUES.match(var["query"]["query"])
        assert parsed, var["query"]
        label = parsed["label"]
        match = substitute(parsed["match"], values, 60) if parsed["match"] else None
        params = {"match[]": match} if match else {}
        found = list(run.prom.api(f"/api/v1/label/{label}/values", **params)["data"])
        assert found, f"variable {var['name']} has no values"
        if instant and match:
            body = run.prom.api("/api/v1/query", query=f"count by ({label}) ({match})", time=f"{run.at:.3f}")
            now = {r["metric"][label] for r in body["data"]["result"]}
            found = [v for v in found if v in now]
        out[var["name"]] = found
    return out


def execute(run: Scraped, target: dict[str, Any], expr: str, end: float | None = None) -> list[dict[str, Any]]:
    """The query as the panel runs it: instant for table targets, else a range query (to `end`, or now)."""
    if target.get("instant"):
        body = run.prom.api("/api/v1/query", query=expr, time=f"{run.at:.3f}")
        assert body["status"] == "success", body
        return list(body["data"]["result"])
    body = run.prom.api(
        "/api/v1/query_range",
        query=expr,
        start=f"{run.start:.3f}",
        end=f"{time.time() if end is None else end:.3f}",
        step=f"{SCRAPE_S}s",
    )
    assert body["status"] == "success", body
    return [series for series in body["data"]["result"] if series["values"]]


def test_variables_offer_the_demo_run(scraped: Scraped) -> None:
    options = variable_values(scraped, ALL, instant=False)
    assert options["job"] == ["tele"]
    assert options["run"] == [RUN]
    assert len(options["instance"]) == 1
    assert options["env"]


def split(name: str) -> str | None:
    """The panel whose queries share its series out (one per level, or a run's own starts), else None."""
    panel = name.rsplit("/", 1)[0]
    targets = next(p["targets"] for p in board()["panels"] if p["title"] == panel and p["type"] != "row")
    return panel if len(targets) > 1 and not targets[0].get("instant") else None


@pytest.mark.parametrize("name,target", query_targets(), ids=[n for n, _ in query_targets()])
def test_query_returns_data(scraped: Scraped, name: str, target: dict[str, Any]) -> None:
    """Every query returns data; a per-run stat's level queries and the charts' own starts together.

    The demo runs on the catalog's starts, so the charts' dashed own starts must return nothing,
    and a per-run stat shows each series from exactly one of its queries.
    """
    window = max(int(time.time() - scraped.start), 10)
    options = variable_values(scraped, ALL, instant=bool(target.get("instant")))
    choices = [ALL] + [{**ALL, var: grafana_escape(value)} for var, values in options.items() for value in values]
    panel = split(name)
    for values in choices:
        if panel is None:
            expr = substitute(target["expr"], values, window)
            if STD in expr:  # absent for the demo's categorical policy, never a 0
                assert not execute(scraped, target, expr), f"{name}: a categorical policy has no std: {expr}"
                continue
            if GAIN in expr and values["env"] != ALL["env"] and not execute(scraped, target, expr):
                # The gain is missing, never 0, until a seed has a pass with data: so are the ratios.
                ratios = substitute(f'{RATIO}{{env=~"$env"}} > 0', values, window)
                assert not execute(scraped, target, ratios), f"{name}: no gain where {ratios} has data"
                continue
            if FIRST in expr:
                # The first non-finite step is absent unless a head went non-finite (missing is never 0):
                # it has data exactly where some head's gradient state is nonfinite (none in a healthy demo).
                nonfinite = substitute(f'{STATE}{{state="nonfinite"}} == 1', values, window)
                has = bool(execute(scraped, target, expr))
                assert has == bool(execute(scraped, target, nonfinite)), f"{name}: {expr} against {nonfinite}"
                continue
            assert execute(scraped, target, expr), f"{name}: no data for {expr}"
            continue
        targets = next(p["targets"] for p in board()["panels"] if p["title"] == panel and p["type"] != "row")
        series: dict[str, list[str]] = {}
        end = scraped.at  # one settled range end for all, so each series' level at its end is the same
        for other in targets:
            for found in execute(scraped, other, substitute(other["expr"], values, window), end):
                series.setdefault(json.dumps(found["metric"], sort_keys=True), []).append(other["refId"])
        if target["refId"].startswith("own "):
            assert not any(target["refId"] in refs for refs in series.values()), f"{name}: own starts for {values}"
            continue
        assert series, f"{name}: no data for {values}"
        assert all(len(refs) == 1 for refs in series.values()), f"{name}: a series in more than one query {series}"


def test_every_query_is_valid_promql(scraped: Scraped) -> None:
    """The API parses each query (a typo would make Grafana show an error, not 'no data')."""
    for name, target in query_targets():
        body = scraped.prom.api("/api/v1/query", query=substitute(target["expr"], ALL, 60))
        assert body["status"] == "success", (name, body)


def test_trend_codes_match_the_live_values(scraped: Scraped) -> None:
    """Per head, the trend code Prometheus computes is the arrow display.head_trend gives."""
    prom = scraped.prom
    catalog = default_catalog()
    cur, prev = catalog["head_grad_norm"], catalog["head_grad_norm_prev"]
    assert prev.trend is not None
    codes = levels.trend_codes(prev.trend)
    table = next(p for p in board()["panels"] if p["title"] == "Action heads: gradient norm, trend and entropy")
    expr = substitute(next(t["expr"] for t in table["targets"] if t["refId"] == "C"), ALL, 60)
    checked = 0
    for step in range(int(scraped.start) + 2, int(scraped.at)):
        # One evaluation time for all three: their latest samples come from one scrape.
        at = f"{step:.3f}"
        got, now, before = (
            {
                r["metric"]["head"]: float(r["value"][1])
                for r in prom.api("/api/v1/query", query=q, time=at)["data"]["result"]
            }
            for q in (expr, cur.name, prev.name)
        )
        for head, code in got.items():
            arrow = head_trend(prev, now[head], before[head])
            if arrow is None:
                assert code == levels.TREND_NONE, head
            else:
                assert codes[int(code)] == (arrow.arrow, arrow.status), (head, now[head], before[head])
            checked += 1
    assert checked
