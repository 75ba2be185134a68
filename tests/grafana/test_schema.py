"""Type-check the generated dashboards against Grafana's own schema types (npm @grafana/schema).

No Grafana server runs here, so the dashboard JSON is written into a TypeScript
file as typed constants and checked with `tsc --noEmit --strict`. Each panel is
checked against its panel plugin's Options (and custom field config) type where
@grafana/schema has one; the dashboard against `Dashboard`. The pinned packages
live in grafana/schema-check/ (`npm ci --prefix grafana/schema-check`).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tele_exporter.catalog import default_catalog
from tele_exporter.generate import dashboards

ROOT = Path(__file__).resolve().parents[2]
CHECK_DIR = ROOT / "grafana" / "schema-check"
DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
CFG = "@grafana/schema/dist/esm/raw/composable/{0}/panelcfg/x/{1}PanelCfg_types.gen"

# Panel type -> (module, has a custom FieldConfig type) in @grafana/schema.
PANEL_TYPES: dict[str, tuple[str, bool]] = {
    "stat": (CFG.format("stat", "Stat"), False),
    "timeseries": (CFG.format("timeseries", "TimeSeries"), True),
    "table": (CFG.format("table", "Table"), True),
    "heatmap": (CFG.format("heatmap", "Heatmap"), True),
}

PRELUDE = """\
import type { Dashboard, Panel, RowPanel } from '@grafana/schema';
{imports}

// JSON holds an enum's value, not the enum: map string enums to their literals.
type Json<T> = T extends string
  ? string extends T ? string : `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends Array<infer U>
      ? Array<Json<U>>
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;

type Typed<O, F> = Omit<Panel<O, F>, 'options'> & { options: O };
"""


def ensure_node_modules() -> None:
    """Install the pinned packages from package-lock.json once (npm ci), if missing."""
    if (CHECK_DIR / "node_modules" / "typescript").is_dir():
        return
    assert shutil.which("npm") and shutil.which("node"), "needs Node.js 18+ and npm"
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(CHECK_DIR)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )


def typescript_source(dashboard: dict[str, Any]) -> str:
    """A .ts module declaring every panel and the dashboard as typed constants."""
    imports = []
    for kind, (module, custom) in sorted(PANEL_TYPES.items()):
        names = f"Options as {kind}Options" + (f", FieldConfig as {kind}Field" if custom else "")
        imports.append(f"import type {{ {names} }} from '{module}';")
    out = [PRELUDE.replace("{imports}", "\n".join(imports))]
    idents = []
    for i, panel in enumerate(dashboard["panels"]):
        ident = f"panel{i}"
        kind = panel["type"]
        if kind == "row":
            annotation = "Json<RowPanel>"
        elif kind in PANEL_TYPES:
            field = f"{kind}Field" if PANEL_TYPES[kind][1] else "Record<string, unknown>"
            annotation = f"Json<Typed<{kind}Options, {field}>>"
        else:
            annotation = "Json<Panel>"
        out.append(f"export const {ident}: {annotation} = {json.dumps(panel, indent=2)};\n")
        idents.append(ident)
    shell = dict(dashboard, panels="@@PANELS@@")
    body = json.dumps(shell, indent=2).replace('"@@PANELS@@"', "[" + ", ".join(idents) + "]")
    out.append(f"export const dashboard: Json<Dashboard> = {body};\n")
    return "\n".join(out)


def run_tsc(boards: dict[str, dict[str, Any]], work: Path) -> dict[str, list[str]]:
    """Type-check each dashboard as its own module in one tsc run; errors by dashboard name."""
    ensure_node_modules()
    for name, board in boards.items():
        (work / f"{name}.ts").write_text(typescript_source(board), encoding="utf-8")
    compiler = {
        "strict": True,
        "noEmit": True,
        "target": "ES2022",
        "module": "ESNext",
        "moduleResolution": "bundler",
        "skipLibCheck": True,
        "types": [],
        "paths": {
            "@grafana/schema": [str(CHECK_DIR / "node_modules/@grafana/schema")],
            "@grafana/schema/*": [str(CHECK_DIR / "node_modules/@grafana/schema/*")],
        },
    }
    config = {"compilerOptions": compiler, "files": [f"{name}.ts" for name in boards]}
    (work / "tsconfig.json").write_text(json.dumps(config), encoding="utf-8")
    tsc = CHECK_DIR / "node_modules" / "typescript" / "bin" / "tsc"
    result = subprocess.run(
        ["node", str(tsc), "--project", str(work / "tsconfig.json"), "--pretty", "false"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=work,
    )
    errors: dict[str, list[str]] = {name: [] for name in boards}
    for line in result.stdout.splitlines():
        file = line.partition("(")[0]
        if file.endswith(".ts") and file[:-3] in errors:
            errors[file[:-3]].append(line)
        elif line.strip() and not line.startswith(" "):
            raise AssertionError(f"tsc failed outside the dashboards: {result.stdout}{result.stderr}")
    assert (result.returncode == 0) == (not any(errors.values())), result.stdout + result.stderr
    return errors


def committed_dashboards() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


# A deliberate schema error each; the type check must reject every one.
BROKEN = (
    "threshold mode",
    "step value type",
    "stat option",
    "unknown field",
    "schemaVersion type",
    "mapping type",
    "row without panels",
)


def _broken(mutate: str) -> dict[str, Any]:
    """The generated dashboard with one deliberate schema error."""
    board = copy.deepcopy(dashboards.dashboard(default_catalog()))
    stat = next(p for p in board["panels"] if p["type"] == "stat")
    series = next(p for p in board["panels"] if p["type"] == "timeseries")
    if mutate == "threshold mode":
        stat["fieldConfig"]["defaults"]["thresholds"]["mode"] = "exact"
    elif mutate == "step value type":
        series["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"] = "0.1"
    elif mutate == "stat option":
        stat["options"]["colorMode"] = "rainbow"
    elif mutate == "unknown field":
        stat["fieldConfig"]["defaults"]["colour"] = "red"
    elif mutate == "schemaVersion type":
        board["schemaVersion"] = "41"
    elif mutate == "mapping type":
        stat["fieldConfig"]["defaults"]["mappings"] = [{"type": "between", "options": {}}]
    elif mutate == "row without panels":
        del next(p for p in board["panels"] if p["type"] == "row")["panels"]
    return board


def _ident(text: str) -> str:
    return re.sub(r"\W", "_", text)


@pytest.fixture(scope="module")
def tsc_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    boards = {f"committed_{_ident(p.stem)}": json.loads(p.read_text(encoding="utf-8")) for p in committed_dashboards()}
    boards.update({f"broken_{_ident(m)}": _broken(m) for m in BROKEN})
    return run_tsc(boards, tmp_path_factory.mktemp("tsc"))


def test_there_are_dashboards() -> None:
    assert committed_dashboards()


@pytest.mark.parametrize("path", committed_dashboards(), ids=lambda p: p.name)
def test_dashboard_type_checks(path: Path, tsc_errors: dict[str, list[str]]) -> None:
    errors = tsc_errors[f"committed_{_ident(path.stem)}"]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("mutate", BROKEN)
def test_broken_dashboard_fails_the_type_check(mutate: str, tsc_errors: dict[str, list[str]]) -> None:
    errors = tsc_errors[f"broken_{_ident(mutate)}"]
    assert any("error TS" in e for e in errors), f"tsc accepted a dashboard with a bad {mutate}"


def test_schema_version_is_grafanas_current() -> None:
    """schemaVersion is the one Grafana 12.4's own schema package writes (defaultDashboard)."""
    ensure_node_modules()
    script = "process.stdout.write(String(require('@grafana/schema').defaultDashboard.schemaVersion))"
    current = subprocess.run(
        ["node", "-e", script], cwd=CHECK_DIR, check=True, capture_output=True, text=True, timeout=60
    ).stdout
    for path in committed_dashboards():
        assert json.loads(path.read_text(encoding="utf-8"))["schemaVersion"] == int(current), path
