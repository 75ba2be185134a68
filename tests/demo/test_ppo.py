"""The PPO trainer in-process: live scrapes, faults, determinism and learning."""

from __future__ import annotations

import math
import re
import statistics
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tele_exporter import default_catalog, serve
from tele_exporter.demo import DemoConfig, FaultPlan, Trainer, UpdateResult
from tele_exporter.demo.ppo import gae
from tele_exporter.snapshot import HeadState, Snapshot

from ..conftest import DESIGN_METRICS

CATALOG = default_catalog()
SMALL = DemoConfig(updates=4, envs=4, steps=16)
HEADS = {"op", "slot", "blueprint", "style", "tempo", "alpha_target", "alpha_speed", "alpha_curve"}

Samples = dict[str, list[tuple[dict[str, str], float]]]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name].append((dict(s.labels), s.value))
    return samples


def by(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {labels[label]: v for labels, v in samples[name]}


def test_gae_matches_a_hand_computation() -> None:
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [0.5], [0.5]])
    dones = torch.tensor([[0.0], [1.0], [0.0]])
    adv, ret = gae(rewards, values, dones, torch.tensor([1.0]), gamma=0.9, lam=0.5)
    d2 = 2.0 + 0.9 * 1.0 - 0.5
    d1 = 0.0 - 0.5  # the episode ends after step 1
    d0 = 1.0 + 0.9 * 0.5 - 0.5
    expected = torch.tensor([[d0 + 0.45 * d1], [d1], [d2]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + values)


def test_live_scrape_has_every_design_metric() -> None:
    trainer = Trainer(SMALL)
    server = serve(trainer.tele, port=0)
    scrapes: list[Samples] = []
    try:
        trainer.run(on_update=lambda r: scrapes.append(scrape(server.url)))
    finally:
        server.close()
        trainer.close()
    assert len(scrapes) == SMALL.updates
    seen_seeds = False
    for k, s in enumerate(scrapes, start=1):
        missing = [m for m in DESIGN_METRICS if m not in s]
        if not s["tele_seed_grad_ratio"]:
            missing = [m for m in missing if not m.startswith("tele_seed_")]
        assert not missing, f"update {k}: missing {missing}"
        assert s["tele_ppo_updates_total"][0][1] == k
        current = by(s, "tele_head_grad_norm", "head")
        assert set(current) == {*HEADS, "value"}
        kinds = {labels["head"]: labels["kind"] for labels, _ in s["tele_head_grad_norm"]}
        assert kinds == {**dict.fromkeys(HEADS, "action"), "value": "other"}
        assert all((math.isfinite(v) and v >= 0) or math.isnan(v) for v in current.values())
        assert set(by(s, "tele_nonfinite_gradients_total", "head").values()) == {0.0}
        # TELE-160/161 from the demo's own new log-probabilities: probabilities, so at most 0, min <= max.
        (low,), (high,) = ([v for _, v in s[name]] for name in ("tele_log_prob_min", "tele_log_prob_max"))
        assert low <= high <= 0.0, (low, high)
        assert set(by(s, "tele_head_gradient_state", "head")) == {*HEADS, "value"}
        prev = by(s, "tele_head_grad_norm_prev", "head")
        expected_prev = by(scrapes[k - 2], "tele_head_grad_norm", "head") if k > 1 else dict.fromkeys(HEADS, 0.0)
        for head in HEADS:
            assert prev[head] == expected_prev[head] or (math.isnan(prev[head]) and math.isnan(expected_prev[head]))
        clip = by(s, "tele_policy_grad_norm", "clip")
        assert 0 < clip["post"] <= min(clip["pre"], SMALL.max_grad_norm) + 1e-9
        kl = s["tele_kl_divergence"][0][1]
        assert 0 <= kl < 1
        assert s["tele_gradient_cv"][0][1] >= 0
        assert s["tele_last_update_timestamp_seconds"][0][1] > 1.6e9
        for labels, ratio in s["tele_seed_grad_ratio"]:
            seen_seeds = True
            assert re.fullmatch(r"[0-3]", labels["env"]) and re.fullmatch(r"r0c[0-2]", labels["slot"])
            assert ratio == 0.0 or 0.5 <= ratio <= 2.0, "healthy seeds in a run without faults"
    assert seen_seeds, "the random early policy germinates seeds"


def run_with_snapshots(config: DemoConfig) -> list[tuple[UpdateResult, Snapshot]]:
    trainer = Trainer(config)
    out: list[tuple[UpdateResult, Snapshot]] = []
    try:
        trainer.run(on_update=lambda r: out.append((r, trainer.tele.snapshot())))
    finally:
        trainer.close()
    return out


def kl_critical(snap: Snapshot) -> bool:
    return CATALOG["kl_divergence"].level_of(snap.kl).status == "critical"  # type: ignore[union-attr]


def grad_critical(snap: Snapshot) -> bool:
    return CATALOG["policy_grad_norm"].level_of(snap.grad_norm_pre).status == "critical"  # type: ignore[union-attr]


def seed_vanishing(snap: Snapshot) -> bool:
    levels = [CATALOG["seed_grad_ratio"].level_of(s.ratio) for s in snap.seeds]
    return any(level is not None and level.name == "vanishing" for level in levels)


def entropy_collapsed(snap: Snapshot) -> bool:
    """TELE-120 critical, TELE-124's flag up and every head with an entropy at TELE-170 critical."""
    p = snap.policy
    heads = [CATALOG["head_entropy"].level_of(v).status for v in p.head_entropy.values()]  # type: ignore[union-attr]
    level = CATALOG["policy_entropy"].level_of(p.entropy)  # type: ignore[arg-type]
    return (
        level is not None
        and level.status == "critical"
        and p.entropy_collapsed == 1.0
        and heads == ["critical"] * len(heads)
    )


def value_broken(snap: Snapshot) -> bool:
    """TELE-200 critical, and far below 0: an untrained value function's first update may sit just under 0."""
    ev = snap.policy.explained_variance
    critical = ev is not None and CATALOG["explained_variance"].level_of(ev).status == "critical"  # type: ignore[union-attr]
    return critical and ev is not None and ev < -1.0


@pytest.mark.parametrize(
    ("mode", "bad"),
    [
        ("kl", kl_critical),
        ("explode", grad_critical),
        ("vanish", seed_vanishing),
        ("entropy", entropy_collapsed),
        ("value", value_broken),
    ],
)
def test_fault_drives_its_signal_past_the_threshold_and_recovers(mode: str, bad: object) -> None:
    plan = FaultPlan(mode, after=1, until=4)
    runs = run_with_snapshots(DemoConfig(updates=7, envs=4, steps=16, fault=plan))
    assert callable(bad)
    flags = [bad(snap) for _, snap in runs]
    assert [r.fault_active for r, _ in runs] == [False, True, True, True, False, False, False]
    assert flags[0] is False
    assert flags[1:4] == [True, True, True], "critical from the first faulty update and held"
    assert flags[5:] == [False, False], "recovers once the fault is off"


def test_kl_fault_counts_early_stops() -> None:
    runs = run_with_snapshots(DemoConfig(updates=2, envs=2, steps=16, fault=FaultPlan("kl")))
    assert all(r.early_stopped for r, _ in runs)
    assert runs[-1][1].early_stops == 2


def test_vanish_fault_keeps_a_seed_live_in_every_update() -> None:
    runs = run_with_snapshots(DemoConfig(updates=5, envs=2, steps=16, fault=FaultPlan("vanish")))
    for _, snap in runs:
        pinned = [s for s in snap.seeds if (s.env, s.slot) == ("0", "r0c0")]
        assert pinned and pinned[0].vanishing and 0 < pinned[0].ratio < 0.5


def test_nan_fault_counts_nonfinite_gradients_and_keeps_params_finite() -> None:
    plan = FaultPlan("nan", after=0, until=3)
    trainer = Trainer(DemoConfig(updates=5, envs=2, steps=16, fault=plan))
    totals: list[dict[str, int]] = []
    try:
        trainer.run(
            on_update=lambda r: totals.append({h.name: h.nonfinite_total for h in trainer.tele.snapshot().heads})
        )
        assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())
    finally:
        trainer.close()
    (head,) = {h for t in totals for h, n in t.items() if n}
    counts = [t[head] for t in totals]
    assert counts[0] > 0 and counts[0] < counts[1] < counts[2], "increases every faulty update"
    assert counts[2] == counts[3] == counts[4], "stops once the fault is off"


def test_a_host_that_diverges_mid_rollout_does_not_stop_training() -> None:
    """Seed 2 of this small demo blends a tempo-2 seed to alpha 1 and its host diverges in update 2 (it crashed)."""
    results = Trainer(DemoConfig(updates=4, envs=4, steps=16, seed=2)).run()
    assert len(results) == 4 and all(math.isfinite(r.reward) for r in results)


def test_same_seed_same_run() -> None:
    config = DemoConfig(updates=2, envs=2, steps=8, seed=7)
    a = [(r.reward, r.kl, r.grad_norm_pre) for r, _ in run_with_snapshots(config)]
    b = [(r.reward, r.kl, r.grad_norm_pre) for r, _ in run_with_snapshots(config)]
    assert a == b


def test_default_run_beats_a_random_policy_and_stays_healthy() -> None:
    config = DemoConfig(seed=0)
    trainer = Trainer(config)
    try:
        results = trainer.run()
        random = statistics.mean(trainer.random_rewards(10))
    finally:
        trainer.close()
    learned = statistics.mean(r.reward for r in results[-10:])
    assert learned > random + 0.02, f"learned {learned:.4f} vs random {random:.4f}"
    levels = {
        name: [CATALOG[metric].level_of(getattr(r, field)) for r in results]
        for name, metric, field in (
            ("kl", "kl_divergence", "kl"),
            ("grad", "policy_grad_norm", "grad_norm_pre"),
            ("cv", "gradient_cv", "gradient_cv"),
        )
    }
    words = {name: [level.name if level else "none" for level in found] for name, found in levels.items()}
    assert words["grad"] == ["healthy"] * len(results), words["grad"]
    assert "critical" not in words["kl"], words["kl"]
    assert words["cv"].count("healthy") >= 0.9 * len(results), words["cv"]
    policy = [r.policy for r in results]
    assert all(CATALOG["policy_entropy"].level_of(p.entropy).name == "healthy" for p in policy)  # type: ignore[arg-type,union-attr]
    assert all(p.entropy_collapsed == 0.0 for p in policy)
    ev = [CATALOG["explained_variance"].level_of(p.explained_variance).status for p in policy]  # type: ignore[arg-type,union-attr]
    assert "critical" not in ev[2:], ev  # an untrained value function may start below 0
    assert all(p.advantage_std is not None and 0.5 < p.advantage_std < 2.0 for p in policy)


def test_head_weights_move_toward_even_head_norms() -> None:
    trainer = Trainer(SMALL)
    try:
        snap = trainer.tele.snapshot()
        norms = {"op": 4.0, "slot": math.nan, "blueprint": 0.5}
        heads = tuple(HeadState(name, norms.get(name, 1.0), 0.0, None, 0) for name in trainer.policy.head_modules())
        trainer._rebalance(replace(snap, heads=heads))
    finally:
        trainer.close()
    weights = trainer.head_weights
    assert weights["slot"] == 1.0, "a missing head keeps its weight"
    assert weights["op"] < 1.0 < weights["blueprint"], weights
    mean = (4.0 + 0.5 + 5 * 1.0) / 7  # over the seven heads with a norm
    assert weights["op"] == pytest.approx(math.sqrt(mean / 4.0))
    assert weights["blueprint"] == pytest.approx(math.sqrt(mean / 0.5))
