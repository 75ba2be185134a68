"""The generated Prometheus rules: fresh, valid, exact to the catalog, and passing promtool tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tele_exporter import cli, generate
from tele_exporter.catalog import default_catalog, load_catalog
from tele_exporter.generate import promql, rules
from tests.prometheus import promtool_cases
from tests.support.servers import PROMTOOL, binary

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary(PROMTOOL), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_generated_files_are_fresh() -> None:
    """`tele-exporter generate --check`: every committed generated file matches the catalog."""
    assert generate.stale(ROOT, default_catalog()) == []


def test_generate_check_command_passes() -> None:
    assert cli.main(["generate", "--check", "--root", str(ROOT)]) == 0


def test_generate_check_command_fails_on_a_stale_file(tmp_path: Path) -> None:
    generate.write(tmp_path, default_catalog())
    (tmp_path / rules.ALERTS_PATH).write_text("groups: []\n", encoding="utf-8")
    assert cli.main(["generate", "--check", "--root", str(tmp_path)]) == 1


def test_rules_and_runbook_are_produced() -> None:
    produced = generate.render(default_catalog())
    assert {rules.RECORDING_PATH, rules.ALERTS_PATH, "docs/runbook.md"} <= set(produced)
    for path in (rules.RECORDING_PATH, rules.ALERTS_PATH):
        assert produced[path].startswith(rules.HEADER)


def test_generation_is_deterministic() -> None:
    assert rules.files(default_catalog()) == rules.files(load_catalog())


@pytest.mark.servers
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.servers
def test_promtool_unit_tests_pass() -> None:
    tests = sorted((ROOT / "prometheus" / "tests").glob("*.yml"))
    assert tests, "no promtool tests in prometheus/tests"
    result = _promtool("test", "rules", *map(str, tests))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_tests_are_fresh() -> None:
    """prometheus/tests/*.yml are built from tests/prometheus/cases; rerun the builder if not."""
    for path, text in promtool_cases.outputs().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path} is stale: run `python -m tests.prometheus.promtool_cases`"
        )


def test_every_alert_has_promtool_tests() -> None:
    alerts = {r.name for r in rules.alert_rules(default_catalog())}
    tested: set[str] = set()
    for path in (ROOT / "prometheus" / "tests").glob("*.yml"):
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            tested.update(check["alertname"] for check in test.get("alert_rule_test", []))
    assert alerts == tested


def test_level_alerts_match_catalog_levels() -> None:
    """Each level with an alert has exactly one rule, with its filter, for: and severity."""
    catalog = default_catalog()
    by_key = {(r.name, r.severity): r for r in rules.alert_rules(catalog)}
    count = 0
    for spec in catalog:
        for level in spec.levels:
            if level.alert is None:
                continue
            rule = by_key[(level.alert.name, level.alert.severity)]
            assert rule.catalog_expr.endswith(promql.interval_filter(level.when))
            assert f"{rule.catalog_expr}\n  unless " in rule.expr  # the fallback for runs without tele_threshold
            assert rule.for_ == level.alert.for_
            assert catalog.selector in rule.expr
            for key, value in spec.alert_on.items():
                assert f'{key}="{value}"' in rule.expr
            count += 1
    # the importance ratio's four only colour now; the normalised entropy's, dead layers' and TELE-160's two
    # page (TELE-160 on runs on the records' scale); TELE-161's and TELE-320's only colour
    assert count == 28


def test_seed_ratio_zero_is_never_vanishing() -> None:
    rule = next(r for r in rules.alert_rules(default_catalog()) if r.name == "TeleSeedGradientVanishing")
    assert "> 0 <" in rule.expr


def test_warning_and_critical_share_an_alert_name() -> None:
    names: dict[str, set[str]] = {}
    for rule in rules.alert_rules(default_catalog()):
        names.setdefault(rule.name, set()).add(rule.severity)
    assert names["TeleKLDivergenceHigh"] == {"warning", "critical"}
    assert names["TeleGradNormHigh"] == {"warning", "critical"}
    assert names["TeleGradientCVHigh"] == {"warning", "critical"}
    for policy_health in (
        "TeleClipFractionHigh",
        "TelePolicyEntropyLow",
        "TeleHeadEntropyLow",
        "TeleExplainedVarianceLow",
        "TeleAdvantageStdLow",
        "TeleAdvantageStdHigh",
        "TeleEntropyNormalizedLow",
        "TeleLogProbLow",
    ):
        assert names[policy_health] == {"warning", "critical"}, policy_health
    assert names["TeleEntropyCollapsed"] == {"critical"}
    assert names["TeleDeadLayers"] == names["TeleLayerGradNormSpike"] == {"warning", "critical"}
    assert set(names) == {
        "TeleLayerGradNormSpike",
        "TeleDeadLayers",
        "TeleGradNormSpike",
        "TeleGradNormDrop",
        "TeleGradNormTrend",
        "TeleHeadGradNormSpike",
        "TeleGradientCVSpike",
        "TeleKLDivergenceSpike",
        "TeleKLDivergenceTrend",
        "TelePolicyEntropyFall",
        "TeleAdvantageStdSpike",
        "TeleAdvantageStdDrop",
        "TeleImportanceRatioSpike",
        "TeleClipFractionHigh",
        "TeleLogProbLow",
        "TelePolicyEntropyLow",
        "TeleEntropyCollapsed",
        "TeleHeadEntropyLow",
        "TeleExplainedVarianceLow",
        "TeleAdvantageStdLow",
        "TeleAdvantageStdHigh",
        "TeleEntropyNormalizedLow",
        "TeleGradNormHigh",
        "TeleGradNormVanishing",
        "TeleKLDivergenceHigh",
        "TeleGradientCVHigh",
        "TeleSeedGradientExploding",
        "TeleSeedGradientVanishing",
        "TeleNonFiniteGradients",
        "TeleTelemetryAbsent",
        "TeleTelemetryErrors",
        "TeleRanksMissing",
        "TeleRankLagging",
    }


def test_annotations_follow_the_mixin_style() -> None:
    alerts = yaml.safe_load(rules.files(default_catalog())[rules.ALERTS_PATH])["groups"][0]["rules"]
    for alert in alerts:
        assert set(alert["annotations"]) == {"summary", "description", "runbook_url"}
        assert "$value" in alert["annotations"]["description"]
        assert "$labels.instance" in alert["annotations"]["description"]
        assert alert["annotations"]["runbook_url"].startswith(default_catalog().runbook + "#")
        assert alert["labels"]["severity"] in ("warning", "critical")


def test_recording_rules_follow_level_metric_operation() -> None:
    records = [r["record"] for r in rules.recording_rules(default_catalog())]
    assert len(records) == len(set(records))
    for name in records:
        level, metric, operation = name.split(":")
        assert level and metric.startswith("tele_") and operation
    assert "instance:tele_kl_divergence:delta5m" in records
    assert "job_clip:tele_step_policy_grad_norm_critical:ratio_rate5m" in records


def test_selector_is_configurable(tmp_path: Path) -> None:
    """A catalog with another selector changes every rule and nothing else."""
    source = default_catalog().path.read_text(encoding="utf-8")
    custom = tmp_path / "catalog.yaml"
    custom.write_text(source.replace("selector: 'job=\"tele\"'", 'selector: \'job="ppo", team="rl"\''))
    catalog = load_catalog(custom)
    assert catalog.selector == 'job="ppo", team="rl"'
    produced = rules.files(catalog)
    for text in produced.values():
        assert 'job="tele"' not in text
    assert 'tele_kl_divergence{job="ppo", team="rl"} >= 0.015 < 0.03' in produced[rules.ALERTS_PATH]
    assert 'up{job="ppo", team="rl"} == 0' in produced[rules.ALERTS_PATH]


def test_bad_selector_is_refused(tmp_path: Path) -> None:
    source = default_catalog().path.read_text(encoding="utf-8")
    custom = tmp_path / "catalog.yaml"
    custom.write_text(source.replace("selector: 'job=\"tele\"'", "selector: '{job=tele}'"))
    with pytest.raises(ValueError, match="selector"):
        load_catalog(custom)


def test_telemetry_errors_alert_on_any_increase_of_the_error_counter() -> None:
    """Telemetry that cannot measure is itself an alert: its values are missing, never 0."""
    (rule,) = [r for r in rules.alert_rules(default_catalog()) if r.name == "TeleTelemetryErrors"]
    assert rule.expr == (
        'increase(tele_telemetry_errors_total{job="tele"}[10m]) > 0\n'
        'or (tele_telemetry_errors_total{job="tele"} > 0 unless tele_telemetry_errors_total{job="tele"} offset 10m)'
    )
    assert (rule.severity, rule.for_) == ("warning", "1m")
    assert "{{ $labels.site }}" in rule.description


def test_rank_alerts_live_in_the_rank_rules_with_catalog_values() -> None:
    """The rank alerts go to tele-ranks.yml, group by job and the catalog's job_label, and take its lag."""
    catalog = default_catalog()
    produced = rules.files(catalog)
    ranks = yaml.safe_load(produced[rules.RANKS_PATH])["groups"][0]["rules"]
    alerts = {r["alert"]: r for r in ranks if "alert" in r}
    assert set(alerts) == {"TeleRanksMissing", "TeleRankLagging"}
    assert "TeleRanksMissing" not in produced[rules.ALERTS_PATH]
    lag = next(a for a in catalog["last_update_timestamp"].alerts if a.kind == "rank_lag")
    assert alerts["TeleRankLagging"]["expr"].endswith(f"> {promql.number(lag.intervals or 0)}")
    assert alerts["TeleRankLagging"]["for"] == lag.for_
    for alert in alerts.values():
        assert f"by (job, {catalog.job_label})" in alert["expr"]
        assert set(alert["annotations"]) == {"summary", "description", "runbook_url"}
        assert "$value" in alert["annotations"]["description"]
        assert f"$labels.{catalog.job_label}" in alert["annotations"]["description"]
    assert "$labels.instance" in alerts["TeleRankLagging"]["annotations"]["description"]
    records = {r["record"]: r["expr"] for r in ranks if "record" in r}
    assert records["job:tele_ranks:count"] == f"sum by (job, {catalog.job_label}) (up{{{catalog.selector}}})"


def test_job_label_is_configurable_and_checked(tmp_path: Path) -> None:
    source = default_catalog().path.read_text(encoding="utf-8")
    custom = tmp_path / "catalog.yaml"
    custom.write_text(source.replace("job_label: training_job", "job_label: experiment"))
    produced = rules.files(load_catalog(custom))[rules.RANKS_PATH]
    assert "training_job" not in produced
    assert "by (job, experiment)" in produced
    for bad in ("instance", "rank", "head", "1x"):
        custom.write_text(source.replace("job_label: training_job", f"job_label: {bad!r}"))
        with pytest.raises(ValueError, match="job_label"):
            load_catalog(custom)


def test_rank_rules_take_the_worst_rank_by_the_side_the_levels_go_bad() -> None:
    """Entropy-like signals go bad low (min), clip fraction and KL high (max), advantage std and ratio both ways."""
    records = {r["record"] for r in rules.rank_rules(default_catalog())}
    assert {
        "job:tele_policy_entropy:min",
        "job:tele_policy_entropy_velocity:min",
        "job:tele_policy_entropy_collapsed:max",
        "job_head:tele_head_entropy_normalized:min",
        "job:tele_explained_variance:min",
        "job:tele_advantage_std:min",
        "job:tele_advantage_std:max",
        "job_head:tele_head_ratio_max:min",
        "job_head:tele_head_ratio_max:max",
        "job:tele_ppo_clip_fraction:max",
        "job_side:tele_ppo_clip_fraction_side:max",
        "job:tele_kl_divergence:max",
        "job:tele_gradient_cv:max",
    } <= records
    assert (
        not {"job:tele_policy_entropy:max", "job:tele_explained_variance:max", "job:tele_ppo_clip_fraction:min"}
        & records
    )
    assert not any("seed" in record for record in records), "env ids repeat on every rank: seeds are not aggregated"


def test_worst_rank_follows_the_catalog_levels_and_shows_nan(tmp_path: Path) -> None:
    """A catalog whose clip fraction went bad low would aggregate it with min; a NaN rank comes first in the `or`."""
    source = default_catalog().path.read_text(encoding="utf-8")
    custom = tmp_path / "catalog.yaml"
    flipped = source.replace('when: "[0, 0.25)"\n        status: ok', 'when: "[0, 0.25)"\n        status: critical', 1)
    flipped = flipped.replace(
        'when: "[0.3, +inf]"\n        status: critical', 'when: "[0.3, +inf]"\n        status: ok', 1
    )
    custom.write_text(flipped)
    records = {r["record"]: r["expr"] for r in rules.rank_rules(load_catalog(custom))}
    assert "job:tele_ppo_clip_fraction:min" in records
    assert "job:tele_ppo_clip_fraction:max" not in records
    series = 'tele_ppo_clip_fraction{job="tele"}'
    assert records["job:tele_ppo_clip_fraction:min"] == (
        f"max without (instance, rank, node) ({series} != {series})\nor\nmin without (instance, rank, node) ({series})"
    )


def test_every_rank_record_has_promtool_tests() -> None:
    """Each cross-rank recording rule is evaluated by at least one promtool test in prometheus/tests/ranks.yml."""
    records = {r["record"] for r in rules.rank_rules(default_catalog())}
    suite = yaml.safe_load((ROOT / "prometheus" / "tests" / "ranks.yml").read_text(encoding="utf-8"))
    exprs = " ".join(check["expr"] for test in suite["tests"] for check in test.get("promql_expr_test", []))
    assert {record for record in records if record not in exprs} == set()
