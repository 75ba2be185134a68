"""README: its metric table matches the catalog, and CI runs the test command it gives."""

from __future__ import annotations

import re
from pathlib import Path

from tele_exporter.catalog import default_catalog

ROOT = Path(__file__).resolve().parents[1]


def test_metric_table_matches_the_catalog() -> None:
    rows = re.findall(r"^\| `(tele_\w+)` \| (\w+) \|\s*([\w, ]*?)\s*\|", (ROOT / "README.md").read_text(), re.M)
    table = {name: (kind, tuple(x.strip() for x in labels.split(",") if x.strip())) for name, kind, labels in rows}
    catalog = {spec.name: (spec.type, spec.labels) for spec in default_catalog()}
    assert table == catalog


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(make test)\b", readme, re.M)
    assert command is not None
    assert command.group(1) in (ROOT / ".ci" / "run").read_text()
