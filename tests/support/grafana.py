"""Dashboard panels as Grafana 12 shows them: their queries on a real Prometheus, their display by Grafana's code.

    responses = panel_responses(prom, board, at=t, values={"job": "tele", "instance": "..."}, window_s=60)
    shown = grafana_display(board, responses)   # {panel id: {"values": [...]} or {"table": {...}}}

Queries run as Grafana's Prometheus data source runs them (instant for table targets, else a
range query ending at `at`, with the template variables substituted); the Prometheus bodies go
unchanged to tests/grafana/grafana_display.cjs, which applies Grafana's own npm code.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from .servers import Running

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_CHECK = ROOT / "grafana" / "schema-check"
HARNESS = ROOT / "tests" / "grafana" / "grafana_display.cjs"
SCRAPE_S = 1


def ensure_node_modules() -> None:
    """Install the pinned npm packages (package-lock.json) when they are missing."""
    if not (SCHEMA_CHECK / "node_modules" / "@grafana" / "prometheus").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(SCHEMA_CHECK)],
            check=True,
            capture_output=True,
            text=True,
        )


def substitute(expr: str, values: dict[str, str], window_s: int) -> str:
    """Grafana's variable interpolation for the variables this dashboard uses."""
    rate = max(4 * SCRAPE_S, 15)
    builtins = {
        "$__rate_interval": f"{rate}s",
        "$__range": f"{window_s}s",
        "$__interval": f"{SCRAPE_S}s",
    }
    for name, value in builtins.items():
        expr = expr.replace(name, value)
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${name}", values[name])
    assert "$" not in expr.replace("$1", ""), f"unsubstituted variable in {expr}"
    return expr


def grafana_escape(value: str) -> str:
    """A variable value as Grafana's Prometheus data source puts it into a =~ matcher.

    Regex metacharacters get a backslash, doubled because the regex sits inside a
    PromQL string literal (prometheusSpecialRegexEscape).
    """
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"""[$^*{}\[\]'+?.()|]""", lambda m: "\\\\" + m.group(0), value)


def panel_responses(
    prom: Running, board: dict[str, Any], at: float, values: dict[str, str], window_s: int
) -> dict[str, dict[str, Any]]:
    """{panel id: {refId: Prometheus API body}} for every PromQL target, evaluated at `at`."""
    out: dict[str, dict[str, Any]] = {}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], values, window_s)
            if target.get("instant"):
                body = prom.api("/api/v1/query", query=expr, time=f"{at:.3f}")
            else:
                start = f"{at - window_s:.3f}"
                body = prom.api("/api/v1/query_range", query=expr, start=start, end=f"{at:.3f}", step=f"{SCRAPE_S}s")
            assert body["status"] == "success", (panel["title"], expr, body)
            out.setdefault(str(panel["id"]), {})[target["refId"]] = body
    return out


def grafana_display(
    board: dict[str, Any], responses: dict[str, dict[str, Any]], keep_name: bool = False
) -> dict[str, Any]:
    """What each panel shows, computed by Grafana's npm code (tests/grafana/grafana_display.cjs)."""
    ensure_node_modules()
    payload = {"dashboard": board, "responses": responses, "keepName": keep_name}
    run = subprocess.run(["node", str(HARNESS)], input=json.dumps(payload), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout))


def by_title(board: dict[str, Any], shown: dict[str, Any], title: str) -> dict[str, Any]:
    """The display of the panel called `title`."""
    (panel,) = [p for p in board["panels"] if p["title"] == title and p["type"] != "row"]
    return dict(shown[str(panel["id"])])
