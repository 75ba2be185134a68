"""catalog: the packaged catalog is valid, and malformed ones fail naming entry and field."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml
from torch import nn

from tele_exporter import Telemetry
from tele_exporter.catalog.model import DEFAULT_PATH, CatalogError, Interval, default_catalog, load_catalog

from ..conftest import DESIGN_METRICS


def test_packaged_catalog_has_every_design_metric() -> None:
    names = {spec.name for spec in default_catalog()}
    assert set(DESIGN_METRICS) <= names


def test_record_boundaries_are_exact() -> None:
    c = default_catalog()
    grad = c["policy_grad_norm"]
    assert [grad.level_of(v).name for v in (0.0999, 0.1, 5.0, 5.0001, 10.0, 10.0001)] == [  # type: ignore[union-attr]
        "vanishing",
        "healthy",
        "healthy",
        "warning",
        "warning",
        "critical",
    ]
    kl = c["kl_divergence"]
    assert [kl.level_of(v).status for v in (0.0149, 0.015, 0.0299, 0.03)] == [  # type: ignore[union-attr]
        "ok",
        "warning",
        "warning",
        "critical",
    ]
    cv = c["gradient_cv"]
    assert [cv.level_of(v).label for v in (0.49, 0.5, 1.99, 2.0)] == ["stable", "warn", "warn", "BAD"]  # type: ignore[union-attr]
    seed = c["seed_grad_ratio"]
    assert [seed.level_of(v).name for v in (0.0, 1e-9, 0.4999, 0.5, 2.0, 2.0001)] == [  # type: ignore[union-attr]
        "no_data",
        "vanishing",
        "vanishing",
        "healthy",
        "healthy",
        "exploding",
    ]
    assert kl.early_stop_factor == 1.5
    assert grad.level_of(math.nan) is None


def _levels(metric_id: str, values: list[float]) -> list[str]:
    spec = default_catalog()[metric_id]
    return [spec.level_of(v).name for v in values]  # type: ignore[union-attr]


def test_policy_health_boundaries_are_exact_as_the_records_state() -> None:
    """NEIGHBOURS.md's TELE-120/121/124/130/140/151/170/200 boundaries, value by value."""
    assert _levels("policy_entropy", [0.0, 0.1, 0.1001, 0.3, 0.3001]) == [
        "critical", "critical", "warning", "warning", "healthy"
    ]  # fmt: skip
    assert _levels("entropy_collapsed", [0.0, 1.0]) == ["ok", "collapsed"]
    assert _levels("entropy_velocity", [-math.inf, -0.03, -0.0299, -0.01, -0.0099, -0.005, -0.0049, 0.0049]) == [
        "rapid_collapse", "rapid_collapse", "declining", "declining", "slow_decline", "other_low", "stable", "stable"
    ]  # fmt: skip
    assert _levels("entropy_velocity", [0.005, 0.01, 0.0101, math.inf]) == [
        "other_high", "other_high", "recovering", "recovering"
    ]  # fmt: skip
    assert _levels("head_entropy", [0.0, 0.25, 0.2501, 0.5, 0.5001, 1.0]) == [
        "critical", "critical", "warning", "warning", "healthy", "healthy"
    ]  # fmt: skip
    assert _levels("clip_fraction", [0.0, 0.2499, 0.25, 0.2999, 0.3]) == [
        "healthy", "healthy", "warning", "warning", "critical"
    ]  # fmt: skip
    assert _levels("explained_variance", [-math.inf, -1e-9, 0.0, 0.3, 0.3001, 0.5, 0.5001, 1.0]) == [
        "critical", "critical", "warning", "warning", "good", "good", "healthy", "healthy"
    ]  # fmt: skip
    assert _levels("advantage_std", [0.0, 0.1, 0.1001, 0.5, 0.5001, 1.9999, 2.0, 3.0, 3.0001]) == [
        "collapsed", "collapsed", "low", "low", "healthy", "healthy", "high", "high", "exploded"
    ]  # fmt: skip
    assert _levels("head_ratio_max", [0.0, 0.4999, 0.5, 0.7999, 0.8, 1.2, 1.2001, 1.5, 1.5001]) == [
        "critical_low", "critical_low", "warning_low", "warning_low", "healthy", "healthy",
        "warning_high", "warning_high", "critical_high",
    ]  # fmt: skip


def test_bad_sides_are_where_warning_or_critical_levels_lie_beside_the_ok_ones() -> None:
    """The side a metric goes bad on, read from its levels: neutral levels (TELE-121's slow decline) are not bad."""
    catalog = default_catalog()
    assert catalog["policy_entropy"].bad_sides() == ("min",)
    assert catalog["entropy_velocity"].bad_sides() == ("min",)
    assert catalog["explained_variance"].bad_sides() == ("min",)
    assert catalog["clip_fraction"].bad_sides() == ("max",)
    assert catalog["entropy_collapsed"].bad_sides() == ("max",)
    assert catalog["advantage_std"].bad_sides() == ("min", "max")
    assert catalog["head_ratio_max"].bad_sides() == ("min", "max")
    assert catalog["head_grad_norm"].bad_sides() == ("min", "max")  # TELE-320: vanishing and exploding
    assert catalog["log_prob_max"].bad_sides() == ("min", "max")  # TELE-161: underflow, and above 0 invalid
    assert catalog["head_clip_fraction"].bad_sides() == ()


def test_histogram_buckets_contain_every_threshold() -> None:
    c = default_catalog()
    for spec in c:
        for ref in spec.of:
            assert set(t for t in c[ref].thresholds() if t > 0) <= set(spec.buckets), spec.id


@pytest.mark.parametrize(
    ("text", "inside", "outside"),
    [
        ("[0.1, 5.0]", [0.1, 5.0], [0.0999, 5.0001]),
        ("(2.0, +inf]", [2.0001, math.inf], [2.0]),
        ("(2.0, +inf)", [2.0001], [2.0, math.inf]),
        ("[0, 0]", [0.0], [1e-12]),
    ],
)
def test_interval_parse(text: str, inside: list[float], outside: list[float]) -> None:
    iv = Interval.parse(text)
    assert all(iv.contains(v) for v in inside)
    assert not any(iv.contains(v) for v in outside)
    assert Interval.parse(str(iv)) == iv


@pytest.mark.parametrize("text", ["0.1, 5", "[5, 1]", "[+inf, +inf]", "(1, 1)", "[a, 2]"])
def test_interval_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        Interval.parse(text)


def _broken(tmp_path: Path, edit: object) -> Path:
    raw = yaml.safe_load(DEFAULT_PATH.read_text())
    edit(raw)  # type: ignore[operator]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["metrics"]["kl_divergence"].pop("help"), r"metrics\.kl_divergence\.help: is required"),
        (
            lambda c: c["metrics"]["kl_divergence"].update(type="summary"),
            r"kl_divergence\.type: 'summary' is not one of",
        ),
        (
            lambda c: c["metrics"]["kl_divergence"]["levels"][1].update(when="[0.016, 0.03)"),
            r"kl_divergence\.levels: level 'warning'.*gap",
        ),
        (
            lambda c: c["metrics"]["kl_divergence"]["levels"][1].update(when="[0.01, 0.03)"),
            r"kl_divergence\.levels: level 'warning'.*overlaps",
        ),
        (
            lambda c: c["metrics"]["gradient_cv"]["levels"][2].update(when="[2.0, 9.0)"),
            r"gradient_cv\.levels: levels end at 9\.0",
        ),
        (
            lambda c: c["metrics"]["explained_variance"]["levels"][0].update(when="(-inf, 0.0)"),
            r"explained_variance\.levels: level 'critical' .* must start at \[-inf",
        ),
        (
            lambda c: c["metrics"]["explained_variance"]["levels"][0].update(when="[-1.0, 0.0)"),
            r"explained_variance\.levels: level 'critical'.*partition \[0, \+inf\] or \[-inf, \+inf\]",
        ),
        (
            lambda c: c["metrics"]["kl_divergence"]["levels"][0].update(when="0..0.015"),
            r"kl_divergence\.levels\[0\]\.when",
        ),
        (
            lambda c: c["metrics"]["ppo_updates"].update(name="tele_ppo_updates"),
            r"ppo_updates\.name: counter .* must end in _total",
        ),
        (
            lambda c: c["metrics"]["seed_grad_ratio"].update(labels=["env", "job"]),
            r"seed_grad_ratio\.labels: label 'job'",
        ),
        (
            lambda c: c["metrics"]["seed_grad_ratio"].update(labels=["env", "__name__"]),
            r"seed_grad_ratio\.labels: label '__name__' starts with '__'",
        ),
        (
            lambda c: c["metrics"]["seed_grad_ratio"].update(labels=["env", "env"]),
            r"seed_grad_ratio\.labels: label 'env' is given twice",
        ),
        (
            lambda c: c["metrics"]["seed_grad_ratio"].update(labels=["env", "slöt"]),
            r"seed_grad_ratio\.labels: label 'slöt' is not a label name",
        ),
        (
            lambda c: c["metrics"]["step_kl_divergence"]["buckets"].insert(1, "0.01x"),
            r"step_kl_divergence\.buckets\[1\]: '0\.01x' is not a number",
        ),
        (
            lambda c: c["metrics"]["step_kl_divergence"].update(buckets=[0.01, 0.02]),
            r"step_kl_divergence\.buckets: thresholds \[0\.015, 0\.03\]",
        ),
        (
            lambda c: c["metrics"]["kl_divergence"]["levels"][2]["alert"].update(severity="page"),
            r"levels\[2\]\.alert\.severity",
        ),
        (
            lambda c: c["metrics"]["kl_divergence"]["levels"][2]["alert"].update(**{"for": "soon"}),
            r"alert\.for: 'soon' is not a duration",
        ),
        (lambda c: c["metrics"]["kl_divergence"].update(colour="red"), r"kl_divergence\.colour: unknown field"),
        (lambda c: c["metrics"]["gradient_cv"].update(precision="three"), r"gradient_cv\.precision: expected int"),
        (lambda c: c["metrics"]["kl_divergence"].update(ranks=["median"]), r"kl_divergence\.ranks\[0\]: 'median'"),
        (
            lambda c: c["metrics"]["kl_divergence"].update(ranks=["sum_rate"]),
            r"ranks\[0\]: 'sum_rate' is not for a gauge",
        ),
        (
            lambda c: c["metrics"]["ppo_updates"].update(ranks=["max"]),
            r"ppo_updates\.ranks\[0\]: 'max' is not for a counter",
        ),
        (
            lambda c: c["metrics"]["kl_divergence"].update(ranks=["worst", "worst"]),
            r"ranks\[1\]: 'worst' is given twice",
        ),
        (
            lambda c: c["metrics"]["kl_divergence"].update(ranks=["worst", "max"]),
            r"kl_divergence\.ranks: 'max' is what 'worst' gives for these levels",
        ),
        (
            lambda c: (  # no data as a second ok level, below vanishing
                c["metrics"]["seed_grad_ratio"]["levels"][0].update(status="ok"),
                c["metrics"]["seed_grad_ratio"].update(ranks=["worst"]),
            ),
            r"seed_grad_ratio\.ranks: 'worst' needs .*level 'vanishing' lies between ok levels",
        ),
        (
            lambda c: c["metrics"]["head_clip_fraction"].update(ranks=["worst"]),
            r"head_clip_fraction\.ranks: 'worst' needs warning or critical levels below or above the ok levels$",
        ),
    ],
)
def test_malformed_catalog_names_entry_and_field(tmp_path: Path, edit: object, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        load_catalog(_broken(tmp_path, edit))


def test_missing_catalog_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="nope.yaml: cannot read the catalog"):
        load_catalog(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("metrics: [unclosed\n")
    with pytest.raises(CatalogError, match="bad.yaml: not valid YAML"):
        load_catalog(path)


@pytest.mark.parametrize(
    ("intervals", "message"),
    [(None, r"alerts\[1\]\.intervals: is required"), (0, r"alerts\[1\]\.intervals: must be a positive")],
)
def test_rank_lag_needs_a_positive_number_of_intervals(tmp_path: Path, intervals: int | None, message: str) -> None:
    def edit(c: dict) -> None:  # type: ignore[type-arg]
        lag = c["metrics"]["last_update_timestamp"]["alerts"][1]
        lag.pop("intervals")
        if intervals is not None:
            lag["intervals"] = intervals

    with pytest.raises(CatalogError, match=message):
        load_catalog(_broken(tmp_path, edit))


def test_aliases_are_refused_before_they_expand(tmp_path: Path) -> None:
    """A billion-laughs catalog (12 KB of YAML, gigabytes expanded) fails at once, naming the alias."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nmetrics: *a9\n")
    with pytest.raises(CatalogError, match=r"bomb\.yaml: not valid YAML: found alias \*a0; aliases are not allowed"):
        load_catalog(path)


def test_a_duplicated_key_is_an_error_not_a_silent_replacement(tmp_path: Path) -> None:
    text = DEFAULT_PATH.read_text()
    match = re.search(r"\n  kl_divergence:\n.*?(?=\n  [a-z_]+:\n)", text, re.S)
    assert match is not None
    entry = match.group(0)
    path = tmp_path / "catalog.yaml"
    path.write_text(text.replace(entry, entry + entry, 1))
    with pytest.raises(CatalogError, match=r"found duplicate key 'kl_divergence'"):
        load_catalog(path)


def test_a_missing_step_histogram_is_named(tmp_path: Path) -> None:
    path = _broken(tmp_path, lambda c: c["metrics"].pop("step_kl_divergence"))
    policy = nn.Linear(2, 2)
    with pytest.raises(CatalogError, match=r"metrics\.step_kl_divergence: is required by tele-exporter but missing"):
        Telemetry(policy, heads={"op": policy}, catalog=load_catalog(path))


def test_a_missing_required_metric_is_named(tmp_path: Path) -> None:
    path = _broken(tmp_path, lambda c: [c["metrics"].pop(m) for m in ("policy_grad_norm", "step_policy_grad_norm")])
    catalog = load_catalog(path)
    policy = nn.Linear(2, 2)
    with pytest.raises(CatalogError, match=r"metrics\.policy_grad_norm: is required by tele-exporter but missing"):
        Telemetry(policy, heads={"op": policy}, catalog=catalog)
