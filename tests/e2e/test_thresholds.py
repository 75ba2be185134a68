"""End to end: runs with different thresholds, scraped by one real Prometheus with the generated rules, unchanged.

Every run is a real Telemetry served on its own port, publishing one KL value that
sits on, or one float below, a boundary. The runs on the catalog's levels (warning
[0.015, critical [0.03) and the runs whose thresholds file moves them (warning
[0.05, critical [0.1) are scraped together as job "tele"; each must alert on its
own levels only, pending at once and firing after the rule's `for:`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from tele_exporter import Telemetry, serve
from tele_exporter.catalog import default_catalog, duration_seconds
from tele_exporter.generate import rules
from tests.support.servers import poll, prometheus_config, start_prometheus

pytestmark = [pytest.mark.slow, pytest.mark.servers]

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
ALERT = "TeleKLDivergenceHigh"
OWN_FILE = "kl_divergence:\n  warning: 0.05\n  critical: 0.1\n"
below = lambda v: math.nextafter(v, -math.inf)  # noqa: E731
# (run label, thresholds file or None for the catalog's levels, KL, expected severity or None)
RUNS = (
    ("catalog-below-0.015", False, below(0.015), None),
    ("catalog-0.015", False, 0.015, "warning"),
    ("catalog-below-0.03", False, below(0.03), "warning"),
    ("catalog-0.03", False, 0.03, "critical"),
    ("catalog-0.06", False, 0.06, "critical"),
    ("own-0.03", True, 0.03, None),
    ("own-below-0.05", True, below(0.05), None),
    ("own-0.05", True, 0.05, "warning"),
    ("own-below-0.1", True, below(0.1), "warning"),
    ("own-0.1", True, 0.1, "critical"),
)
EXPECTED = {(run, severity) for run, _, _, severity in RUNS if severity is not None}


@contextlib.contextmanager
def _runs(thresholds_file: Path) -> Iterator[list[str]]:
    """Every run of RUNS served on a free port, its KL published; yields the scrape addresses."""
    with contextlib.ExitStack() as stack:
        addresses = []
        for run, own, kl, _ in RUNS:
            policy = nn.Linear(2, 2)
            tele = Telemetry(
                policy,
                heads={"all": policy},
                const_labels={"run": run},
                thresholds_file=thresholds_file if own else None,
                scale="records",  # the KL levels page runs on the records' scale (a run's own scale pages spikes)
            )
            stack.callback(tele.close)
            server = serve(tele, port=0, addr="127.0.0.1")
            stack.callback(server.close)
            with tele.update() as upd:
                upd.observe_kl_value(kl)
            addresses.append(f"127.0.0.1:{server.port}")
        yield addresses


def _kl_alerts(alerts: list[dict[str, object]], state: str) -> set[tuple[str, str]]:
    found = set()
    for alert in alerts:
        labels = alert["labels"]
        assert isinstance(labels, dict)
        if labels["alertname"] == ALERT and alert["state"] == state:
            found.add((labels["run"], labels["severity"]))
    return found


def test_each_run_alerts_on_its_own_levels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TELE_EXPORTER_THRESHOLDS", raising=False)
    file = tmp_path / "thresholds.yml"
    file.write_text(OWN_FILE, encoding="utf-8")
    with _runs(file) as addresses, start_prometheus(prometheus_config(addresses), rule_files=RULE_FILES) as prom:
        kl = default_catalog()["kl_divergence"].name

        def all_scraped() -> list[dict[str, Any]] | None:
            result = prom.query(f'{kl}{{job="tele"}}')
            return result if len(result) == len(RUNS) else None

        scraped = poll(all_scraped, timeout=60, what="every run scraped")
        by_run = {r["metric"]["run"]: float(r["value"][1]) for r in scraped}
        assert by_run == {run: value for run, _, value, _ in RUNS}  # exact through the exposition and the TSDB
        levels = {
            (r["metric"]["run"], r["metric"]["level"]): float(r["value"][1])
            for r in prom.query(f'tele_threshold{{job="tele", metric="{kl}"}}')
        }
        assert {lv for (run, lv), v in levels.items() if run == "own-0.05"} == {"warning", "critical"}
        assert levels[("own-0.05", "critical")] == 0.1 and levels[("catalog-0.03", "critical")] == 0.03

        def active(*states: str) -> set[tuple[str, str]] | None:
            """The (run, severity) alerts in `states`, once they include every expected one."""
            alerts = prom.alerts()
            found = set().union(*(_kl_alerts(alerts, state) for state in states))
            return found if found >= EXPECTED else None

        pending = poll(lambda: active("pending", "firing"), timeout=60, what="every expected alert pending")
        assert pending == EXPECTED, "an alert outside its run's own level"
        longest = max(duration_seconds(r.for_) for r in rules.alert_rules(default_catalog()) if r.name == ALERT)
        firing = poll(lambda: active("firing"), timeout=longest + 60, what="every expected alert firing")
        assert firing == EXPECTED
        assert _kl_alerts(prom.alerts(), "pending") == set()
