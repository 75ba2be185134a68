"""Precision and recall of the generated alerts on recorded runs of real trainers, replayed with promtool.

Fixtures: tests/alerting/fixtures, recorded by scripts/record_alert_runs.py from real
Stable-Baselines3 (Discrete, MultiDiscrete, Box), CleanRL-style, TorchRL and RLlib (two
learner actors, two ranks) runs, healthy and with real faults. The expectations are the
promises the alerts make, written here: a healthy run pages nothing while it lives and
nothing after it ends cleanly; a crashed one pages TeleTelemetryAbsent within 10 minutes; a
fault pages its alert within 10 PPO updates (NaN within 3) and nothing pages before the fault.
"""

from __future__ import annotations

import pytest

from tests.support.servers import PROMTOOL, binary

from .replay import AFTER_END_S, SCRAPE_S, UPDATE_S, Run, first_firings, promtool_test, run_promtool, runs

pytestmark = pytest.mark.servers

# Which alerts may answer each fault: the page a person needs for it.
EXPECTED = {
    "explode": {"TeleGradNormSpike", "TeleHeadGradNormSpike", "TeleGradNormTrend"},
    "nan": {"TeleNonFiniteGradients"},
    "entropy": {"TeleEntropyNormalizedLow", "TelePolicyEntropyFall"},
    "kl": {"TeleKLDivergenceSpike", "TeleKLDivergenceHigh", "TeleKLDivergenceTrend"},
    "value": {"TeleHeadGradNormSpike", "TeleGradNormSpike", "TeleGradNormTrend"},
}
WITHIN_UPDATES = {"nan": 3}
RUNS = runs()
HEALTHY = [r for r in RUNS if r.fault is None]
FAULTED = [r for r in RUNS if r.fault is not None]


def _alerts(expr_filter: str, horizon: int) -> str:
    return (
        f'min by (alertname, severity) (min_over_time(timestamp(ALERTS{{alertstate="firing"{expr_filter}}})'
        f"[{horizon}s:{SCRAPE_S}s]))"
    )


def test_the_fixtures_cover_every_trainer_and_fault() -> None:
    names = {r.name for r in RUNS}
    trainers = {"sb3-cartpole", "sb3-multidiscrete", "sb3-pendulum", "cleanrl-cartpole", "torchrl-cartpole"}
    assert trainers | {"rllib-cartpole"} <= names, "a trainer without a healthy recording"
    assert {r.fault for r in FAULTED} == set(EXPECTED)


@pytest.mark.parametrize("run", HEALTHY, ids=[r.name for r in HEALTHY])
def test_a_healthy_run_pages_nothing_while_it_lives_nor_after_a_clean_end(run: Run) -> None:
    horizon = run.end + AFTER_END_S
    result = run_promtool(promtool_test(run, [(_alerts("", horizon), horizon, [])]), binary(PROMTOOL))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("run", HEALTHY, ids=[r.name for r in HEALTHY])
def test_a_run_killed_after_its_last_update_pages_telemetry_absent_within_10_minutes(run: Run) -> None:
    fired = first_firings(run, crash=True, promtool=binary(PROMTOOL))
    assert fired.get(("TeleTelemetryAbsent", "critical"), float("inf")) <= run.end + 600, fired


@pytest.mark.parametrize("run", FAULTED, ids=[r.name for r in FAULTED])
def test_a_fault_pages_its_alert_soon_and_nothing_pages_before_it(run: Run) -> None:
    assert run.fault is not None and run.fault_time is not None
    fired = first_firings(run, promtool=binary(PROMTOOL))
    early = {key: t for key, t in fired.items() if t < run.fault_time}
    assert not early, f"paged before the fault at {run.fault_time}s: {early}"
    deadline = run.fault_time + UPDATE_S * WITHIN_UPDATES.get(run.fault, 10)
    answered = {key: t for key, t in fired.items() if key[0] in EXPECTED[run.fault] and t <= deadline}
    assert answered, f"no {sorted(EXPECTED[run.fault])} by {deadline}s; fired: {fired}"
    if run.crashed:  # the fault killed the trainer: that pages too, within 10 minutes
        assert fired.get(("TeleTelemetryAbsent", "critical"), float("inf")) <= run.end + 600, fired
