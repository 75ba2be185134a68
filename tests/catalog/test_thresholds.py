"""Per-run thresholds: validated against the catalog, exact at every moved boundary, exported, shown."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tele_exporter import Telemetry
from tele_exporter.catalog import default_catalog
from tele_exporter.catalog.display import show
from tele_exporter.catalog.thresholds import THRESHOLDS_ENV, ThresholdsError, apply, load_thresholds, movable, resolve
from tele_exporter.server.http import snapshot_document

from ..conftest import TinyPolicy

CATALOG = default_catalog()
OWN = {"policy_grad_norm": {"warning": 50, "critical": 100}, "kl_divergence": {"warning": 0.05, "critical": 0.1}}


def _telemetry(policy: TinyPolicy, **kwargs: object) -> Telemetry:
    return Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("thresholds", "culprit"),
    [
        ({"policy_grad": {"warning": 1.0}}, "thresholds: policy_grad: not a catalog signal with levels"),
        ({"head_clip_fraction": {"warning": 1.0}}, "thresholds: head_clip_fraction: not a catalog signal with levels"),
        ({"step_kl_divergence": {"warning": 1.0}}, "step_kl_divergence: not a catalog signal"),
        (
            {"kl_divergence": {"alarm": 0.1}},
            "kl_divergence.alarm: no such level (levels that can move: warning, critical)",
        ),
        ({"kl_divergence": {"healthy": 0.1}}, "kl_divergence.healthy: the level starts at 0 and cannot move"),
        ({"seed_grad_ratio": {"vanishing": 0.1}}, "seed_grad_ratio.vanishing: the level starts at 0 and cannot move"),
        ({"kl_divergence": {"critical": 0.01}}, "kl_divergence.critical: starts at 0.01, not above 'warning' at 0.015"),
        (
            {"kl_divergence": {"warning": 0.03}},
            "kl_divergence.critical: starts at 0.03 (the catalog's; set 'critical' too), not above 'warning' at 0.03",
        ),
        ({"gradient_cv": {"warning": -1.0}}, "gradient_cv.warning: starts at -1.0, not above 'healthy' at 0.0"),
        ({"gradient_cv": {"warning": math.nan}}, "gradient_cv.warning: nan is not a finite number"),
        ({"gradient_cv": {"critical": math.inf}}, "gradient_cv.critical: inf is not a finite number"),
        ({"gradient_cv": {"critical": "2"}}, "gradient_cv.critical: '2' is not a number"),
        ({"gradient_cv": {"critical": True}}, "gradient_cv.critical: True is not a number"),
        ({"gradient_cv": 2.0}, "gradient_cv: expected a mapping of level -> value"),
        ([("gradient_cv", {})], "thresholds: expected a mapping of signal -> level -> value"),
    ],
)
def test_bad_thresholds_raise_naming_the_culprit(policy: TinyPolicy, thresholds: object, culprit: str) -> None:
    with pytest.raises(ThresholdsError) as info:
        _telemetry(policy, thresholds=thresholds)
    assert culprit in str(info.value)


def test_numpy_numbers_are_thresholds_as_python_numbers_are(policy: TinyPolicy) -> None:
    """A level start computed with numpy (np.int64, np.float64) moves the level as the Python number does."""
    tele = _telemetry(policy, thresholds={"policy_grad_norm": {"warning": np.int64(60), "critical": np.float64(120.0)}})
    grad = tele.catalog["policy_grad_norm"]
    assert (grad.level("warning").when.low, grad.level("critical").when.low) == (60.0, 120.0)
    tele.close()
    with pytest.raises(ThresholdsError, match=r"policy_grad_norm\.warning: np\.True_ is not a number"):
        _telemetry(policy, thresholds={"policy_grad_norm": {"warning": np.bool_(True)}})


def test_moved_starts_keep_the_catalogs_open_and_closed_ends() -> None:
    own = apply(CATALOG, OWN)
    grad, kl = own["policy_grad_norm"], own["kl_divergence"]
    assert [str(lv.when) for lv in grad.levels] == ["[0.0, 0.1)", "[0.1, 50.0]", "(50.0, 100.0]", "(100.0, +inf]"]
    assert [str(lv.when) for lv in kl.levels] == ["[0.0, 0.05)", "[0.05, 0.1)", "[0.1, +inf]"]
    assert CATALOG["policy_grad_norm"].level("warning").when.low == 5.0  # the catalog itself is untouched


@pytest.mark.parametrize(
    ("value", "level"),
    [
        (50.0, "healthy"),
        (math.nextafter(50.0, math.inf), "warning"),
        (100.0, "warning"),
        (math.nextafter(100.0, math.inf), "critical"),
        (10.5, "healthy"),
        (math.inf, "critical"),
    ],
)
def test_a_moved_open_start_is_exact_at_its_boundary(value: float, level: str) -> None:
    assert show(apply(CATALOG, OWN)["policy_grad_norm"], value).level == level


@pytest.mark.parametrize(
    ("value", "level"),
    [
        (0.0, "healthy"),
        (math.nextafter(0.05, -math.inf), "healthy"),
        (0.05, "warning"),
        (0.03, "healthy"),  # critical on the catalog's levels
        (math.nextafter(0.1, -math.inf), "warning"),
        (0.1, "critical"),
    ],
)
def test_a_moved_closed_start_is_exact_at_its_boundary(value: float, level: str) -> None:
    assert show(apply(CATALOG, OWN)["kl_divergence"], value).level == level


def test_a_run_exports_its_levels_and_the_catalogs_elsewhere(policy: TinyPolicy) -> None:
    tele = _telemetry(policy, thresholds=OWN, const_labels={"run": "a"})
    samples = {
        (s.labels["metric"], s.labels["level"]): (s.value, s.labels["run"])
        for family in text_string_to_metric_families(generate_latest(tele.registry).decode())
        if family.name == "tele_threshold"
        for s in family.samples
    }
    # Levels that start at 0 or below (a signed metric's, e.g. TELE-160's log-probabilities) are not movable.
    levelled = {spec.name for spec in CATALOG if movable(spec) and spec.type != "histogram"}
    assert {metric for metric, _ in samples} == levelled, "every levelled metric exports its levels"
    moved = {"tele_policy_grad_norm", "tele_gradient_cv", "tele_kl_divergence", "tele_seed_grad_ratio"}
    assert {key: value for key, value in samples.items() if key[0] in moved} == {
        ("tele_policy_grad_norm", "healthy"): (0.1, "a"),
        ("tele_policy_grad_norm", "warning"): (50.0, "a"),
        ("tele_policy_grad_norm", "critical"): (100.0, "a"),
        ("tele_gradient_cv", "warning"): (0.5, "a"),
        ("tele_gradient_cv", "critical"): (2.0, "a"),
        ("tele_kl_divergence", "warning"): (0.05, "a"),
        ("tele_kl_divergence", "critical"): (0.1, "a"),
        ("tele_seed_grad_ratio", "healthy"): (0.5, "a"),
        ("tele_seed_grad_ratio", "exploding"): (2.0, "a"),
    }
    tele.close()


def test_a_run_without_thresholds_exports_the_catalogs_levels(policy: TinyPolicy) -> None:
    tele = _telemetry(policy)
    assert tele.catalog == CATALOG
    text = generate_latest(tele.registry).decode()
    assert 'tele_threshold{level="critical",metric="tele_kl_divergence"} 0.03' in text
    tele.close()


def test_the_file_comes_first_and_code_overrides_it_level_by_level(tmp_path: Path) -> None:
    file = tmp_path / "thresholds.yml"
    file.write_text("kl_divergence: {warning: 0.02, critical: 0.2}\ngradient_cv:\n  critical: 4\n", encoding="utf-8")
    own = resolve(CATALOG, {"kl_divergence": {"critical": 0.1}}, file)
    assert [lv.when.low for lv in own["kl_divergence"].levels] == [0.0, 0.02, 0.1]
    assert [lv.when.low for lv in own["gradient_cv"].levels] == [0.0, 0.5, 4.0]


def test_the_environment_names_a_file_when_the_code_names_none(
    policy: TinyPolicy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "thresholds.yml"
    file.write_text("gradient_cv: {warning: 1, critical: 3}\n", encoding="utf-8")
    monkeypatch.setenv(THRESHOLDS_ENV, str(file))
    tele = _telemetry(policy)
    assert tele.catalog["gradient_cv"].level("critical").when.low == 3.0
    tele.close()


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        ("kl_divergence: {warning: 0.5}\n", "thresholds.yml: kl_divergence.critical: starts at 0.03"),
        ("kl_divergence: {warning: 0.02, warning: 0.03}\n", "duplicate key 'warning'"),
        ("- kl_divergence\n", "thresholds.yml: expected a mapping"),
        ("kl_divergence: [", "thresholds.yml: not valid YAML"),
    ],
)
def test_a_bad_file_is_named_with_its_culprit(tmp_path: Path, text: str, culprit: str) -> None:
    file = tmp_path / "thresholds.yml"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(ThresholdsError, match="thresholds.yml") as info:
        resolve(CATALOG, thresholds_file=file)
    assert culprit in str(info.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ThresholdsError, match="nope.yml: cannot read the thresholds file"):
        load_thresholds(tmp_path / "nope.yml")


def test_the_snapshot_api_shows_values_in_the_runs_own_levels(policy: TinyPolicy) -> None:
    """A KL of 0.06 is critical on the catalog's levels and in this run's warning level."""
    catalog_run, own_run = _telemetry(policy), _telemetry(policy, thresholds=OWN)
    for tele in (catalog_run, own_run):
        with tele.update() as upd:
            upd.observe_kl_value(0.06)
    assert snapshot_document(catalog_run)["snapshot"]["kl"]["shown"]["status"] == "critical"
    shown = snapshot_document(own_run)["snapshot"]["kl"]["shown"]
    assert (shown["level"], shown["status"]) == ("warning", "warning")
    catalog_run.close()
    own_run.close()
