"""policy_stats against float64 numpy references written from the records' formulas (NEIGHBOURS.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tele_exporter.measure.dispatch_counter import DispatchCounter
from tele_exporter.measure.policy_math import (
    advantage_std,
    approx_kl,
    check_head_tensors,
    entropy_terms,
    entropy_velocity,
    explained_variance_terms,
    head_entropy_normalized,
    log_prob_terms,
    ratio_terms,
)

HEADS = ("op", "slot", "style")


# --- the records' formulas in float64 numpy ------------------------------------------


def ref_joint_entropy(ent: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> float:
    """TELE-120: per step, the sum of the entropies of the heads its causal mask lets act; mean over steps."""
    steps = len(next(iter(ent.values())))
    per_step = [sum(float(ent[h][t]) for h in ent if masks[h][t]) for t in range(steps)]
    return float(np.mean(per_step))


def ref_head_normalized(values: np.ndarray, mask: np.ndarray, n_actions: int) -> float | None:
    """TELE-170: the head's mean entropy over its valid steps over log(n); missing for n = 1 or no valid step."""
    if n_actions == 1 or not mask.any():
        return None
    return float(np.mean(values[mask.astype(bool)]) / np.log(n_actions))


def ref_slope(history: list[float]) -> float:
    """TELE-121: least-squares slope, from numpy's own polynomial fit."""
    return float(np.polyfit(np.arange(len(history), dtype=np.float64), np.asarray(history), 1)[0])


def ref_ev(values: np.ndarray, returns: np.ndarray) -> float | None:
    var = np.var(returns)
    return None if var == 0 else float(1.0 - np.var(returns - values) / var)


def ref_ratio(log_ratio: dict[str, np.ndarray], masks: dict[str, np.ndarray], eps: float) -> tuple[float, ...]:
    """TELE-130 on the joint ratio (product of the active heads' ratios) and TELE-151's per-head max."""
    steps = len(next(iter(log_ratio.values())))
    joint = np.ones(steps)
    for h, r in log_ratio.items():
        joint *= np.where(masks[h], np.exp(np.clip(r, -20.0, 20.0)), 1.0)
    high = float(np.mean(joint > 1 + eps))
    low = float(np.mean(joint < 1 - eps))
    cf = float(np.mean(np.abs(joint - 1) > eps))
    maxima = [float(np.max(np.exp(np.clip(r[masks[h]], -20.0, 20.0)))) for h, r in log_ratio.items()]
    return (cf, high, low, *maxima)


def ref_head_clip(log_ratio: dict[str, np.ndarray], masks: dict[str, np.ndarray], eps: float) -> list[float]:
    """Per head: the fraction of its valid steps whose own ratio left [1 - eps, 1 + eps] (records' commit 4bd6d816)."""
    out = []
    for h, r in log_ratio.items():
        own = np.exp(np.clip(r[masks[h].astype(bool)], -20.0, 20.0))
        out.append(float(np.count_nonzero(np.abs(own - 1.0) > eps)) / len(own))
    return out


# --- tests ------------------------------------------------------------------------------


def _inputs(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ent = {h: rng.uniform(0.0, 1.5, 64) for h in HEADS}
    masks = {"op": np.ones(64, dtype=bool), "slot": rng.random(64) < 0.6, "style": rng.random(64) < 0.3}
    return ent, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_joint_and_per_head_entropy_match_the_reference(seed: int) -> None:
    ent, masks = _inputs(seed)
    terms = entropy_terms({h: torch.tensor(v) for h, v in ent.items()}, {h: torch.tensor(m) for h, m in masks.items()})
    assert float(terms[0]) == pytest.approx(ref_joint_entropy(ent, masks), rel=1e-12)
    sizes = [6, 5, 3]
    t = terms.tolist()
    for i, h in enumerate(HEADS):
        normalized = head_entropy_normalized(t[1 + i], t[4 + i], sizes[i])
        assert normalized == pytest.approx(ref_head_normalized(ent[h], masks[h], sizes[i]), rel=1e-12)


def test_float32_entropies_are_summed_in_float64() -> None:
    ent = {"op": np.full(100_000, 0.1, dtype=np.float32)}
    terms = entropy_terms({"op": torch.tensor(ent["op"])})
    assert float(terms[0]) == pytest.approx(float(np.float32(0.1)), rel=1e-12)


def test_a_one_action_head_and_an_all_masked_head_have_no_normalized_entropy() -> None:
    ent = {"op": np.full(8, 0.7), "slot": np.zeros(8), "style": np.full(8, 0.4)}
    masks = {"op": np.ones(8, dtype=bool), "slot": np.ones(8, dtype=bool), "style": np.zeros(8, dtype=bool)}
    terms = entropy_terms({h: torch.tensor(v) for h, v in ent.items()}, {h: torch.tensor(m) for h, m in masks.items()})
    t = terms.tolist()
    normalized = [head_entropy_normalized(t[1 + i], t[4 + i], n) for i, n in enumerate([4, 1, 3])]
    assert normalized[0] == pytest.approx(0.7 / math.log(4), rel=1e-12)
    assert math.isnan(normalized[1]) and math.isnan(normalized[2])
    assert ref_head_normalized(ent["slot"], masks["slot"], 1) is None
    assert ref_head_normalized(ent["style"], masks["style"], 3) is None
    assert float(terms[0]) == pytest.approx(0.7, rel=1e-12)  # neither contributes to the joint entropy


def test_nan_entropy_is_data_but_a_masked_out_nan_is_not_counted() -> None:
    masked = entropy_terms(
        {
            "op": torch.tensor([0.5, math.nan], dtype=torch.float64),
            "slot": torch.tensor([0.2, 0.2], dtype=torch.float64),
        },
        {"op": torch.tensor([True, False])},
    )
    assert float(masked[0]) == pytest.approx((0.5 + 0.2 + 0.2) / 2, rel=1e-12)
    unmasked = entropy_terms({"op": torch.tensor([0.5, math.nan])})
    assert math.isnan(float(unmasked[0]))


@pytest.mark.parametrize("n", [2, 3, 7, 10])
def test_entropy_velocity_is_numpy_least_squares_slope(n: int) -> None:
    history = list(np.random.default_rng(n).uniform(0.0, 2.0, n))
    assert entropy_velocity(history) == pytest.approx(ref_slope(history), rel=1e-9, abs=1e-15)


def test_entropy_velocity_needs_two_values_and_nan_is_data() -> None:
    assert entropy_velocity([]) is None and entropy_velocity([1.0]) is None
    assert entropy_velocity([1.0, 0.9, 0.8]) == pytest.approx(-0.1, rel=1e-12)
    velocity = entropy_velocity([1.0, math.nan, 0.8])
    assert velocity is not None and math.isnan(velocity)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_explained_variance_matches_the_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    returns = rng.normal(size=200)
    values = returns + rng.normal(scale=0.5 + seed, size=200)
    terms = explained_variance_terms(torch.tensor(values, dtype=torch.float32), torch.tensor(returns))
    expected = ref_ev(np.float32(values).astype(np.float64), returns)
    assert float(terms[0]) == pytest.approx(expected, rel=1e-12)


def test_explained_variance_of_constant_returns_is_undefined() -> None:
    terms = explained_variance_terms(torch.tensor([0.1, 0.5, 0.2]), torch.full((3,), 2.0))
    assert float(terms[1]) == 0.0  # publish reports it missing
    assert ref_ev(np.array([0.1, 0.5, 0.2]), np.full(3, 2.0)) is None


def test_explained_variance_below_zero_for_a_broken_value_function() -> None:
    returns = np.array([1.0, 2.0, 3.0, 4.0])
    values = -returns
    terms = explained_variance_terms(torch.tensor(values), torch.tensor(returns))
    assert float(terms[0]) == pytest.approx(ref_ev(values, returns), rel=1e-12)
    assert float(terms[0]) == pytest.approx(-3.0, rel=1e-12)


def test_advantage_std_is_the_sample_std_of_the_valid_steps() -> None:
    rng = np.random.default_rng(3)
    adv = rng.normal(scale=2.5, size=100)
    mask = rng.random(100) < 0.7
    std, n = advantage_std(torch.tensor(adv), torch.tensor(mask))
    assert float(std) == pytest.approx(float(np.std(adv[mask], ddof=1)), rel=1e-12)
    assert float(n) == mask.sum()
    normalized = (adv - adv.mean()) / adv.std(ddof=1)
    assert float(advantage_std(torch.tensor(normalized))[0]) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_fraction_parts_and_ratio_max_match_the_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    log_ratio = {h: rng.normal(scale=0.15, size=128) for h in HEADS}
    log_ratio["op"][0] = 30.0  # clamped to 20
    _, masks = _inputs(seed)
    masks = {h: np.resize(m, 128) for h, m in masks.items()}
    terms = ratio_terms(
        {h: torch.tensor(v) for h, v in log_ratio.items()}, {h: torch.tensor(m) for h, m in masks.items()}, 0.2
    )
    expected = ref_ratio(log_ratio, masks, 0.2)
    assert [float(t) for t in terms[:6]] == pytest.approx(list(expected), rel=1e-12)
    assert float(terms[0]) == pytest.approx(float(terms[1] + terms[2]), rel=1e-12)
    assert [float(t) for t in terms[6:9]] == [float(m.sum()) for m in masks.values()]
    assert [float(t) for t in terms[9:]] == pytest.approx(ref_head_clip(log_ratio, masks, 0.2), rel=1e-12)


def test_a_heads_clip_fraction_is_nan_when_one_of_its_valid_ratios_is() -> None:
    terms = ratio_terms(
        {"op": torch.tensor([0.5, math.nan]), "slot": torch.tensor([0.0, math.nan])},
        {"slot": torch.tensor([1.0, 0.0])},  # slot's NaN is masked out: not its data
        0.2,
    )
    op_clip, slot_clip = terms[-2:].tolist()
    assert math.isnan(op_clip) and slot_clip == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_prob_extremes_match_the_reference(seed: int) -> None:
    """TELE-160/161: min and max over every head's valid entries, as numpy finds them."""
    rng = np.random.default_rng(seed)
    _, masks = _inputs(seed)
    logp = {h: -rng.exponential(3.0, size=64) for h in HEADS}
    logp["style"][~masks["style"]] = -500.0  # masked out: never the minimum
    terms = log_prob_terms(
        {h: torch.tensor(v) for h, v in logp.items()}, {h: torch.tensor(m) for h, m in masks.items()}
    )
    valid = np.concatenate([logp[h][masks[h]] for h in HEADS])
    assert terms.tolist() == [float(valid.min()), float(valid.max()), float(len(valid))]
    nan = log_prob_terms({"op": torch.tensor([-1.0, math.nan]), "slot": torch.tensor([-2.0, -3.0])})
    assert all(math.isnan(v) for v in nan[:2].tolist())


@pytest.mark.parametrize("heads", [2, 8, 64])
def test_log_prob_extremes_cost_the_same_launches_for_any_number_of_heads(heads: int) -> None:
    """Heads of one shape are stacked: a call costs 12 ops with masks whatever the heads (it cost two more
    per head before), and still finds a NaN and leaves a masked-out entry out."""
    torch.manual_seed(0)
    logp = {f"h{i}": -torch.rand(64) for i in range(heads)}
    masks = {f"h{i}": torch.rand(64) < 0.7 for i in range(heads)}
    logp["h1"][0], masks["h1"][0] = math.nan, False  # masked out: not data
    with DispatchCounter() as counter:
        terms = log_prob_terms(logp, masks)
    assert sum(counter.ops.values()) <= 12 and counter.reads == 0, counter.ops
    valid = torch.cat([logp[h][masks[h]] for h in logp]).double()
    assert terms.tolist() == [valid.min().item(), valid.max().item(), float(valid.numel())]
    masks["h1"][0] = True  # now it counts: both extremes NaN
    assert all(math.isnan(v) for v in log_prob_terms(logp, masks)[:2].tolist())


@pytest.mark.parametrize("heads", [2, 8, 64])
def test_float_masks_are_compared_once_for_every_head(heads: int) -> None:
    """0/1 float masks (the demo's) are stacked and compared once: an entropy, ratio or KL call costs one op
    more than with bool masks at most, whatever the heads (one more per head before), with the same values."""
    torch.manual_seed(0)
    values = {f"h{i}": torch.randn(64) * 0.1 for i in range(heads)}
    bool_masks = {f"h{i}": torch.rand(64) < 0.7 for i in range(heads)}
    float_masks = {h: m.float() for h, m in bool_masks.items()}
    for fn in (entropy_terms, ratio_terms, approx_kl):
        ops = {}
        for kind, masks in (("bool", bool_masks), ("float", float_masks)):
            with DispatchCounter() as counter:
                got = fn(values, masks)
            assert counter.reads == 0
            ops[kind] = sum(counter.ops.values())
            torch.testing.assert_close(got, fn(values, bool_masks), rtol=0, atol=0)
        assert ops["float"] <= ops["bool"] + 1, (fn.__name__, ops)


def test_an_all_masked_head_has_no_valid_ratio_and_nan_is_data() -> None:
    terms = ratio_terms(
        {"op": torch.tensor([0.1, -0.5]), "slot": torch.tensor([3.0, 3.0])}, {"slot": torch.zeros(2)}, 0.2
    )
    assert float(terms[6]) == 0.0  # slot: no valid step, left out at publish
    assert float(terms[0]) == pytest.approx(0.5)  # exp(-0.5) < 0.8; slot's 3.0 is masked out
    nan = ratio_terms({"op": torch.tensor([0.1, math.nan])}, None, 0.2)
    assert all(math.isnan(float(t)) for t in nan[:4])


def test_a_step_no_head_acts_in_is_padding_left_out_of_the_clip_fraction() -> None:
    """RLlib's loss mask pads episodes with steps nobody acts in: the fraction is over the acting steps."""
    rng = np.random.default_rng(3)
    log_ratio = rng.normal(scale=0.3, size=200)
    acting = rng.random(200) < 0.8
    terms = ratio_terms({"op": torch.tensor(log_ratio)}, {"op": torch.tensor(acting)}, 0.2)
    ratio = np.exp(log_ratio[acting])
    assert float(terms[0]) == pytest.approx(float(np.mean(np.abs(ratio - 1) > 0.2)), rel=1e-12)
    assert float(terms[1]) == pytest.approx(float(np.mean(ratio > 1.2)), rel=1e-12)
    assert float(terms[2]) == pytest.approx(float(np.mean(ratio < 0.8)), rel=1e-12)
    nobody = ratio_terms({"op": torch.tensor([0.5, 0.5])}, {"op": torch.zeros(2, dtype=torch.bool)}, 0.2)
    assert [float(t) for t in nobody[:3]] == [0.0, 0.0, 0.0]  # no acting step: nothing clipped


def test_bad_input_names_the_head() -> None:
    good = torch.zeros(4)
    with pytest.raises(ValueError, match="'value'"):
        check_head_tensors("observe_entropy", {"value": good}, None, HEADS)
    with pytest.raises(ValueError, match="mask of head 'slot'"):
        check_head_tensors("observe_entropy", {"op": good, "slot": good}, {"slot": torch.zeros(3)}, HEADS)
    with pytest.raises(ValueError, match="head 'slot' has 5 timesteps"):
        check_head_tensors("observe_ratios", {"op": good, "slot": torch.zeros(5)}, None, HEADS)
    with pytest.raises(TypeError, match="head 'op' is a list"):
        check_head_tensors("observe_entropy", {"op": [0.1]}, None, HEADS)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="head 'op' has no timesteps"):
        check_head_tensors("observe_entropy", {"op": torch.zeros(0)}, None, HEADS)


def test_heads_stack_as_they_are_or_one_by_one_with_the_same_values() -> None:
    """Heads of one shape and dtype are stacked as given (graph and all, detached after); a [T, 1] head beside
    [T] heads, or a float32 head beside float64 ones, takes the per-head path: the values agree either way."""
    torch.manual_seed(0)
    flat = {h: torch.randn(16, dtype=torch.float64) for h in HEADS}
    masks = {h: torch.rand(16) < 0.6 for h in HEADS}
    expected = entropy_terms(flat, masks)
    with_graph = {h: t.clone().requires_grad_(True) for h, t in flat.items()}
    got = entropy_terms(with_graph, masks)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    mixed = {"op": flat["op"].reshape(16, 1), "slot": flat["slot"], "style": flat["style"]}
    mixed_masks = {"op": masks["op"].reshape(16, 1), "slot": masks["slot"], "style": masks["style"]}
    torch.testing.assert_close(entropy_terms(mixed, mixed_masks), expected, rtol=0, atol=0)
    cast = {**flat, "op": flat["op"].float()}
    torch.testing.assert_close(entropy_terms(cast, masks), entropy_terms({**flat, "op": cast["op"].double()}, masks))
