"""The policy-health signals end to end: Update.observe_* calls, one transfer, snapshot and a real scrape."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import tele_exporter.telemetry.packer as packer_module
from tele_exporter import Telemetry

from ..conftest import TinyPolicy
from ..measure.test_policy_math import ref_ev, ref_joint_entropy, ref_ratio, ref_slope

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(tele: Telemetry) -> Samples:
    text = generate_latest(tele.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def tele(policy: TinyPolicy) -> Iterator[Telemetry]:
    t = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, action_sizes={"op": 4, "slot": 3})
    yield t
    t.close()


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def test_every_signal_matches_the_float64_reference_through_one_transfer(
    tele: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    gathers: list[int] = []
    real_gather = packer_module.gather
    monkeypatch.setattr(packer_module, "gather", lambda parts: gathers.append(len(parts)) or real_gather(parts))
    rng = np.random.default_rng(7)
    ent = [{"op": rng.uniform(0, 1.4, 32), "slot": rng.uniform(0, 1.1, 32)} for _ in range(3)]
    masks = [{"op": np.ones(32, dtype=bool), "slot": rng.random(32) < 0.5} for _ in range(3)]
    lr = [{"op": rng.normal(scale=0.2, size=32), "slot": rng.normal(scale=0.2, size=32)} for _ in range(3)]
    values, returns = rng.normal(size=64), rng.normal(size=64)
    adv = [rng.normal(scale=1.3, size=32) for _ in range(2)]
    with tele.update() as upd:
        upd.observe_explained_variance(t64(values), t64(returns))
        for e, m, r in zip(ent, masks, lr, strict=True):
            upd.observe_entropy({h: t64(v) for h, v in e.items()}, {h: torch.tensor(v) for h, v in m.items()})
            upd.observe_ratios({h: t64(v) for h, v in r.items()}, {h: torch.tensor(v) for h, v in m.items()})
        for a in adv:
            upd.observe_advantages(t64(a))
    assert len(gathers) == 1
    got = scrape(tele)
    joint = float(np.mean([ref_joint_entropy(e, m) for e, m in zip(ent, masks, strict=True)]))
    assert got[("tele_policy_entropy", ())] == pytest.approx(joint, rel=1e-12)
    assert got[("tele_policy_entropy_collapsed", ())] == 0.0
    for head, n in (("op", 4), ("slot", 3)):
        valid = np.concatenate([e[head][m[head]] for e, m in zip(ent, masks, strict=True)])
        expected = float(np.mean(valid) / np.log(n))
        assert got[("tele_head_entropy_normalized", (("head", head),))] == pytest.approx(expected, rel=1e-12)
        maxima = [ref_ratio(r, m, 0.2)[3 + ("op", "slot").index(head)] for r, m in zip(lr, masks, strict=True)]
        assert got[("tele_head_ratio_max", (("head", head),))] == pytest.approx(max(maxima), rel=1e-12)
    parts = np.array([ref_ratio(r, m, 0.2)[:3] for r, m in zip(lr, masks, strict=True)])
    assert got[("tele_ppo_clip_fraction", ())] == pytest.approx(parts[:, 0].mean(), rel=1e-12)
    assert got[("tele_ppo_clip_fraction_side", (("side", "high"),))] == pytest.approx(parts[:, 1].mean(), rel=1e-12)
    assert got[("tele_ppo_clip_fraction_side", (("side", "low"),))] == pytest.approx(parts[:, 2].mean(), rel=1e-12)
    assert got[("tele_explained_variance", ())] == pytest.approx(ref_ev(values, returns), rel=1e-12)
    std = float(np.mean([np.std(a, ddof=1) for a in adv]))
    assert got[("tele_advantage_std", ())] == pytest.approx(std, rel=1e-12)
    assert ("tele_policy_entropy_velocity", ()) not in got  # one update: no slope yet
    assert got[("tele_step_policy_entropy_count", ())] == 3.0
    assert got[("tele_step_ppo_clip_fraction_count", ())] == 3.0


def test_velocity_is_the_slope_of_the_last_ten_update_entropies(tele: Telemetry) -> None:
    levels = [1.2 - 0.05 * i + 0.01 * (i % 3) for i in range(13)]
    for level in levels:
        with tele.update() as upd:
            upd.observe_entropy({"op": torch.full((4,), level, dtype=torch.float64)})
    snap = tele.snapshot().policy
    assert snap.entropy_history == pytest.approx(levels[-10:], rel=1e-15)
    assert scrape(tele)[("tele_policy_entropy_velocity", ())] == pytest.approx(ref_slope(levels[-10:]), rel=1e-9)


def test_missing_values_are_absent_never_zero(policy: TinyPolicy) -> None:
    """A one-action head, an all-masked head, Var(returns) = 0 and an update without policy data."""
    tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, action_sizes={"op": 1, "slot": 3})
    with tele.update() as upd:
        upd.observe_entropy({"op": torch.zeros(4), "slot": torch.ones(4)}, {"slot": torch.zeros(4)})
        upd.observe_ratios({"op": torch.zeros(4), "slot": torch.ones(4)}, {"slot": torch.zeros(4)})
        upd.observe_explained_variance(torch.randn(4), torch.full((4,), 3.0))
        upd.observe_advantages(torch.tensor([0.5]))
    got = scrape(tele)
    assert not [k for k in got if k[0] == "tele_head_entropy_normalized"]
    assert [k for k in got if k[0] == "tele_head_ratio_max"] == [("tele_head_ratio_max", (("head", "op"),))]
    assert ("tele_explained_variance", ()) not in got
    assert ("tele_advantage_std", ()) not in got  # one transition has no sample std
    assert got[("tele_policy_entropy", ())] == 0.0
    assert got[("tele_policy_entropy_collapsed", ())] == 1.0
    with tele.update():
        pass
    got = scrape(tele)
    for name in ("tele_policy_entropy", "tele_policy_entropy_collapsed", "tele_ppo_clip_fraction"):
        assert (name, ()) not in got
    tele.close()


@pytest.mark.parametrize(("entropy", "collapsed"), [(0.1, 0.0), (math.nextafter(0.1, 0.0), 1.0), (0.3, 0.0)])
def test_collapse_is_strict_at_the_threshold(tele: Telemetry, entropy: float, collapsed: float) -> None:
    with tele.update() as upd:
        upd.observe_entropy({"op": torch.tensor([entropy], dtype=torch.float64)})
    assert scrape(tele)[("tele_policy_entropy_collapsed", ())] == collapsed
    shown = tele.snapshot().to_dict(tele.catalog)["policy"]["entropy"]["shown"]
    assert shown["status"] == ("critical" if entropy <= 0.1 else "warning")  # TELE-120: <= 0.1 is critical


def test_nan_is_data(tele: Telemetry) -> None:
    with tele.update() as upd:
        upd.observe_entropy({"op": torch.tensor([math.nan, 0.5])})
        upd.observe_ratios({"op": torch.tensor([math.nan, 0.0])})
        upd.observe_explained_variance(torch.tensor([math.nan, 1.0]), torch.tensor([0.0, 1.0]))
    got = scrape(tele)
    for key in (
        ("tele_policy_entropy", ()),
        ("tele_policy_entropy_collapsed", ()),
        ("tele_head_entropy_normalized", (("head", "op"),)),
        ("tele_ppo_clip_fraction", ()),
        ("tele_head_ratio_max", (("head", "op"),)),
        ("tele_explained_variance", ()),
    ):
        assert math.isnan(got[key]), key
    payload = json.loads(json.dumps(tele.snapshot().to_dict(tele.catalog)))
    assert payload["policy"]["entropy"]["value"] == "NaN"


def test_a_librarys_own_ratio_maxima_join_the_heads_max_through_the_one_transfer(
    tele: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TELE-151 over observe_ratios and observe_ratio_max_value alike: the largest wins, clamped to exp(+-20)."""
    gathers: list[int] = []
    real_gather = packer_module.gather
    monkeypatch.setattr(packer_module, "gather", lambda parts: gathers.append(len(parts)) or real_gather(parts))
    lr = np.array([0.1, -0.3, 0.25, 0.0])
    with tele.update() as upd:
        upd.observe_ratios({"op": t64(lr)})
        upd.observe_ratio_max_value({"op": torch.tensor(1.125, dtype=torch.float32)})  # below exp(0.25)
        upd.observe_ratio_max_value({"slot": 1.5})
        upd.observe_ratio_max_value({"slot": torch.tensor(1.75)})
    assert len(gathers) == 1
    got = scrape(tele)
    assert got[("tele_head_ratio_max", (("head", "op"),))] == pytest.approx(math.exp(0.25), rel=1e-15)
    assert got[("tele_head_ratio_max", (("head", "slot"),))] == 1.75
    assert ("tele_ppo_clip_fraction", ()) in got and got[("tele_step_ppo_clip_fraction_count", ())] == 1.0
    with tele.update() as upd:
        upd.observe_ratio_max_value({"op": math.inf, "slot": 0.0})
    got = scrape(tele)
    assert got[("tele_head_ratio_max", (("head", "op"),))] == math.exp(20.0)  # as observe_ratios clamps r
    assert got[("tele_head_ratio_max", (("head", "slot"),))] == math.exp(-20.0)
    assert ("tele_ppo_clip_fraction", ()) not in got  # a maximum says nothing about the clip fraction
    with tele.update() as upd:
        upd.observe_ratio_max_value({"op": 2.0})
        upd.observe_ratio_max_value({"op": math.nan})
        upd.observe_ratio_max_value({"op": 3.0})
    got = scrape(tele)
    assert math.isnan(got[("tele_head_ratio_max", (("head", "op"),))])  # NaN is data, and wins
    assert ("tele_head_ratio_max", (("head", "slot"),)) not in got  # not observed this update: absent


def test_action_std_is_the_mean_of_the_updates_calls_and_absent_without_one(tele: Telemetry) -> None:
    with tele.update() as upd:
        upd.observe_entropy({"op": torch.ones(2)})
    assert not [k for k in scrape(tele) if k[0] == "tele_policy_std"]  # a categorical policy: no series, never 0
    assert tele.snapshot().to_dict(tele.catalog)["policy"]["action_std"]["value"] is None
    log_std = torch.tensor([-0.5, 0.25], dtype=torch.float32)
    with tele.update() as upd:
        returned = upd.observe_action_std_value(torch.exp(log_std).mean())
        upd.observe_action_std_value(0.5)
    expected = (float(np.exp(np.float32(-0.5))) + float(np.exp(np.float32(0.25)))) / 2  # float32 exp, float64 mean
    own = float(torch.exp(log_std).mean())
    assert returned.dtype == torch.float64 and float(returned) == own
    assert own == pytest.approx(expected, rel=1e-7)
    assert scrape(tele)[("tele_policy_std", ())] == (own + 0.5) / 2
    assert tele.snapshot().to_dict(tele.catalog)["policy"]["action_std"]["value"] == (own + 0.5) / 2


def test_snapshot_json_carries_history_velocity_and_heads(tele: Telemetry) -> None:
    for level in (1.0, 0.9, 0.8):
        with tele.update() as upd:
            upd.observe_entropy({"op": torch.full((2,), level), "slot": torch.full((2,), level)})
    policy = tele.snapshot().to_dict(tele.catalog)["policy"]
    assert policy["entropy"]["history"] == pytest.approx([2.0, 1.8, 1.6], rel=1e-6)
    assert policy["entropy"]["velocity"]["value"] == pytest.approx(-0.2, rel=1e-6)
    assert policy["entropy"]["velocity"]["shown"]["label"] == "[vv]"
    assert set(policy["head_entropy"]) == {"op", "slot"}
    assert policy["head_entropy"]["op"]["value"] == pytest.approx(0.8 / math.log(4), rel=1e-6)


def test_bad_input_gets_an_error_naming_it(policy: TinyPolicy, tele: Telemetry) -> None:
    with pytest.raises(ValueError, match="'value'"):
        Telemetry(policy, heads={"op": policy.op}, action_sizes={"value": 2})
    with pytest.raises(ValueError, match=r"action_sizes\['op'\]"):
        Telemetry(policy, heads={"op": policy.op}, action_sizes={"op": 0})
    with tele.update() as upd:
        with pytest.raises(ValueError, match="unknown head 'value' in observe_entropy"):
            upd.observe_entropy({"value": torch.zeros(3)})
        with pytest.raises(ValueError, match="values has 3 elements, returns has 4"):
            upd.observe_explained_variance(torch.zeros(3), torch.zeros(4))
        with pytest.raises(TypeError, match="returns is a list"):
            upd.observe_explained_variance(torch.zeros(3), [0.0, 1.0, 2.0])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="observe_advantages: mask has shape"):
            upd.observe_advantages(torch.zeros(3), torch.ones(4))
        with pytest.raises(ValueError, match="clip_eps"):
            upd.observe_ratios({"op": torch.zeros(3)}, clip_eps=1.5)
    with pytest.raises(RuntimeError, match="inside"):
        upd.observe_entropy({"op": torch.zeros(3)})


def test_disabled_telemetry_returns_the_values_and_publishes_none(policy: TinyPolicy) -> None:
    tele = Telemetry(policy, heads={"op": policy.op}, action_sizes={"op": 4}, enabled=False)
    with tele.update() as upd:
        joint = upd.observe_entropy({"op": torch.full((3,), 0.5)})
        ev = upd.observe_explained_variance(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]))
        cf = upd.observe_ratios({"op": torch.tensor([0.0, 1.0])})
    assert float(joint) == pytest.approx(0.5) and float(ev) == pytest.approx(0.75) and float(cf) == 0.5
    assert tele.snapshot().policy.entropy is None
