"""Pictures of the Grafana dashboard for the docs, drawn from what Grafana's own code computes.

No Grafana server runs here. This starts real demo runs (healthy and faulted), scrapes them
with Debian's Prometheus, runs every panel query, and lets tests/grafana/grafana_display.cjs
(npm @grafana/data and @grafana/prometheus) compute each stat's and table cell's text and
colour. Those are laid out on the dashboard's own grid in an HTML page, which headless
chromium screenshots into docs/img/grafana-<run>.png. Time series lines are the raw
Prometheus samples drawn as plain SVG with the panel's threshold lines (their legend values
are Grafana's text); the heatmap is not drawn. Run from the repo root:

    PYTHONPATH=exporter:. python scripts/grafana_pictures.py
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.demo import start_demo
from tests.support.grafana import grafana_display, grafana_escape, panel_responses
from tests.support.servers import Running, poll, prometheus_config, start_prometheus

from tele_exporter.generate import dashboards

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"healthy": ("none", "3"), "explode": ("explode", "3"), "nan": ("nan", "3")}
MIN_UPDATES = 8
COL_PX, ROW_PX = 58, 34
# Grafana 12's dark theme (createTheme() in @grafana/data): page, panel, border, text.
PAGE, PANEL, BORDER, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e8e"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _stat(panel: dict[str, Any], shown: dict[str, Any]) -> str:
    values = shown.get("values") or []
    background = panel["options"].get("colorMode") == "background"
    cells = []
    for v in values:
        colour = v.get("hex") or TEXT
        style = f"background:{colour};color:#fff" if background else f"color:{colour}"
        name = f'<div class="name">{_e(v.get("name", ""))}</div>' if len(values) > 1 else ""
        cells.append(f'<div class="stat" style="{style}">{name}<div class="big">{_e(v["text"])}</div></div>')
    return "".join(cells) or '<div class="nodata">No data</div>'


def _table(shown: dict[str, Any]) -> str:
    table = shown["table"]
    head = "".join(f"<th>{_e(c)}</th>" for c in table["columns"])
    rows = "".join(
        "<tr>" + "".join(f'<td style="color:{c.get("hex") or TEXT}">{_e(c["text"])}</td>' for c in row) + "</tr>"
        for row in table["rows"]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _timeseries(panel: dict[str, Any], shown: dict[str, Any], body: dict[str, Any], w: int, h: int) -> str:
    series = [[float(v) for _, v in s["values"]] for s in body["data"]["result"]]
    finite = [v for s in series for v in s if math.isfinite(v)]
    steps = [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["value"] is not None]
    visible = [v for v in steps if v < 1e300]
    top = max(finite + visible + [1e-9]) * 1.1
    plot_h = h - 60

    def y(v: float) -> float:
        return plot_h - min(max(v, 0.0), top) / top * plot_h

    lines = []
    for step in panel["fieldConfig"]["defaults"]["thresholds"]["steps"][1:]:
        lines.append(
            f'<line x1="0" x2="{w}" y1="{y(step["value"]):.1f}" y2="{y(step["value"]):.1f}" '
            f'stroke="{_threshold_hex(step["color"])}" stroke-dasharray="6 4" stroke-width="1"/>'
        )
    palette = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a"]
    for i, s in enumerate(series):
        pts = " ".join(f"{j / max(len(s) - 1, 1) * w:.1f},{y(v):.1f}" for j, v in enumerate(s) if math.isfinite(v))
        lines.append(f'<polyline points="{pts}" fill="none" stroke="{palette[i % 4]}" stroke-width="2"/>')
    legend = "".join(
        f'<div class="legend"><span style="color:{palette[i % 4]}">━</span> {_e(v["name"])}'
        f'<span class="last">last {_e(v["text"])}</span></div>'
        for i, v in enumerate(shown.get("values") or [])
    )
    return f'<svg width="{w}" height="{plot_h}">{"".join(lines)}</svg>{legend}'


def _threshold_hex(name: str) -> str:
    return {"green": "#73bf69", "yellow": "#fade2a", "red": "#f2495c"}.get(name, TEXT)


def _alerts(prom: Running, instance: str) -> str:
    firing = [
        a
        for a in prom.api("/api/v1/alerts")["data"]["alerts"]
        if a["state"] == "firing" and a["labels"].get("instance", instance) == instance
    ]
    if not firing:
        return '<div class="nodata">No firing Tele alerts</div>'
    items = "".join(
        f'<div class="alert"><span class="sev {a["labels"].get("severity", "")}">'
        f"{_e(a['labels'].get('severity', ''))}</span> {_e(a['labels']['alertname'])}</div>"
        for a in firing
    )
    return items


def page(board: dict[str, Any], shown: dict[str, Any], responses: dict[str, Any], prom: Running, instance: str) -> str:
    """The dashboard as an HTML page: every panel at its grid position."""
    parts = []
    height = 0
    for panel in board["panels"]:
        g = panel["gridPos"]
        x, y, w, h = g["x"] * COL_PX, g["y"] * ROW_PX, g["w"] * COL_PX - 6, g["h"] * ROW_PX - 6
        height = max(height, y + h + 10)
        pid = str(panel["id"])
        if panel["type"] == "row":
            parts.append(f'<div class="row" style="left:{x}px;top:{y}px;width:{w}px">{_e(panel["title"])}</div>')
            continue
        if panel["type"] == "stat":
            body = _stat(panel, shown.get(pid, {}))
        elif panel["type"] == "table":
            body = _table(shown[pid])
        elif panel["type"] == "timeseries":
            body = _timeseries(panel, shown[pid], responses[pid]["A"], w - 16, h - 30)
        elif panel["type"] == "alertlist":
            body = _alerts(prom, instance)
        else:
            body = '<div class="nodata">heatmap: not drawn in this picture</div>'
        parts.append(
            f'<div class="panel" style="left:{x}px;top:{y}px;width:{w}px;height:{h}px">'
            f'<div class="title">{_e(panel["title"])}</div><div class="body">{body}</div></div>'
        )
    css = f"""
body {{ margin:0; background:{PAGE}; color:{TEXT}; font-family: Inter, Helvetica, Arial, sans-serif; }}
.board {{ position:relative; margin:12px; height:{height}px; }}
.row {{ position:absolute; font-size:15px; font-weight:600; padding-top:8px; }}
.panel {{ position:absolute; background:{PANEL}; border:1px solid {BORDER}; border-radius:2px; overflow:hidden; }}
.title {{ font-size:13px; font-weight:500; padding:6px 8px; }}
.body {{ padding:0 8px; display:flex; flex-wrap:wrap; gap:6px; align-content:flex-start; }}
.stat {{ flex:1; min-width:120px; padding:6px; border-radius:2px; text-align:center; }}
.big {{ font-size:34px; font-weight:500; }}
.name {{ font-size:11px; color:{MUTED}; }}
.nodata {{ color:{MUTED}; padding:20px; }}
table {{ border-collapse:collapse; width:100%; font-size:13px; }}
th {{ text-align:left; color:#6e9fff; font-weight:500; border-bottom:1px solid {BORDER}; padding:4px 6px; }}
td {{ padding:3px 6px; border-bottom:1px solid #22252b; }}
.legend {{ font-size:12px; width:100%; }}
.last {{ float:right; color:{MUTED}; }}
.alert {{ width:100%; font-size:13px; padding:3px 0; }}
.sev {{ padding:1px 6px; border-radius:2px; background:#3d71d9; color:#fff; font-size:11px; }}
.sev.critical {{ background:#d10e5c; }} .sev.warning {{ background:#b8860b; }}
"""
    header = f'<div style="margin:12px 12px 0;font-size:18px">{_e(board["title"])} · instance {_e(instance)}</div>'
    head = f'<head><meta charset="utf-8"><style>{css}</style></head>'
    return f'<html>{head}<body>{header}<div class="board">{"".join(parts)}</div></body></html>'


def screenshot(html_text: str, out: Path, height: int) -> None:
    """Headless chromium renders the page to `out`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "board.html"
        src.write_text(html_text, encoding="utf-8")
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--screenshot={out}",
                f"--window-size={24 * COL_PX + 30},{height}",
                src.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main() -> None:
    board = json.loads((ROOT / dashboards.PATH).read_text(encoding="utf-8"))
    with contextlib.ExitStack() as stack:
        demos = {
            name: stack.enter_context(start_demo("--seed", "7", "--fault", fault, "--fault-after", after))
            for name, (fault, after) in RUNS.items()
        }
        rules = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
        start = time.time()
        prom = stack.enter_context(
            start_prometheus(prometheus_config([d.address for d in demos.values()]), rule_files=rules)
        )
        poll(
            lambda: len(prom.query(f"tele_ppo_updates_total >= {MIN_UPDATES}")) == len(RUNS),
            timeout=600,
            interval=1.0,
            what=f"{MIN_UPDATES} updates from every demo",
        )
        for name, demo in demos.items():
            # The demo grows and prunes seeds: wait for an instant with some, to show the table.
            seeds = f'count(tele_seed_grad_ratio{{instance="{demo.address}"}})'
            poll(lambda q=seeds: prom.query(q), timeout=300, interval=0.5, what=f"live seeds in {name}")
            at = time.time()
            values = {"job": "tele", "instance": grafana_escape(demo.address), "env": ".*"}
            responses = panel_responses(prom, board, at, values, int(at - start))
            shown = grafana_display(board, responses)
            rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
            out = ROOT / "docs" / "img" / f"grafana-{name}.png"
            screenshot(page(board, shown, responses, prom, demo.address), out, rows * ROW_PX + 80)
            print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
