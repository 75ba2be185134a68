"""The shipped prometheus.yml and alertmanager.yml pass promtool and amtool and fit the rules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tele_exporter.catalog import default_catalog
from tests.support.servers import AMTOOL, PROMTOOL, binary

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "prometheus" / "prometheus.yml"
ALERTMANAGER_YML = ROOT / "prometheus" / "alertmanager.yml"

pytestmark = pytest.mark.servers


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_promtool_check_config() -> None:
    result = _run(binary(PROMTOOL), "check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 rule files found" in result.stdout


def test_amtool_check_config() -> None:
    result = _run(binary(AMTOOL), "check-config", str(ALERTMANAGER_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_job_matches_the_rules_selector() -> None:
    """The default selector job="tele" must select the shipped scrape job."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert f'job="{next(iter(jobs))}"' in default_catalog().selector
    assert jobs["tele"]["static_configs"][0]["targets"] == ["127.0.0.1:9842"]
    assert config["rule_files"] == ["rules/tele-recording.yml", "rules/tele-alerts.yml", "rules/tele-ranks.yml"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]


def test_alertmanager_routes_by_severity_and_inhibits_warnings() -> None:
    config = yaml.safe_load(ALERTMANAGER_YML.read_text(encoding="utf-8"))
    matchers = [route["matchers"] for route in config["route"]["routes"]]
    assert ['severity="critical"'] in matchers and ['severity="warning"'] in matchers
    (inhibit,) = config["inhibit_rules"]
    assert inhibit["source_matchers"] == ['severity="critical"']
    assert inhibit["target_matchers"] == ['severity="warning"']
    assert "alertname" in inhibit["equal"]
    urls = {h["url"] for r in config["receivers"] for h in r.get("webhook_configs", [])}
    assert urls == {"http://127.0.0.1:5001/"}
