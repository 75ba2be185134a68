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


def test_readme_documents_the_fast_tier_as_the_makefile_runs_it() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    markers = re.search(r"^FAST_MARKERS := (.+)$", makefile, re.M)
    assert markers is not None and markers.group(1) == "not servers and not browser"
    assert f'`pytest -m "{markers.group(1)}"`' in readme
    assert re.search(r"^test-fast: .*\n\t\$\(RUN_IN_ENV\) \$\(PY\) -m pytest -m \"\$\(FAST_MARKERS\)\"", makefile, re.M)


def test_docker_compose_commands_are_the_validated_v1_form() -> None:
    for path in (ROOT / "README.md", ROOT / "docs" / "grafana.md"):
        commands = re.findall(r"^(docker[ -]compose) ", path.read_text(), re.M)
        assert commands and set(commands) == {"docker-compose"}, (path.name, commands)
