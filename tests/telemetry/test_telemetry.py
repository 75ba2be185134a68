"""Telemetry: drop-in clipping, per-head values, prev/history/trend semantics, faults, user mistakes."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from tele_exporter import Telemetry
from tele_exporter.stats import grad_norms, gradient_cv

from ..conftest import TinyPolicy, backward


def _update(
    tele: Telemetry, policy: TinyPolicy, steps: int, scale: float = 1.0, seed: int = 0
) -> list[dict[str, float]]:
    """One PPO update of `steps` optimizer steps; returns the reference per-head norms of each step."""
    reference = []
    with tele.update() as upd:
        for i in range(steps):
            backward(policy, scale=scale, seed=seed * 100 + i)
            ref = grad_norms(
                {"op": [p.grad for p in policy.op.parameters()], "slot": [p.grad for p in policy.slot.parameters()]}
            )
            ref["total"] = grad_norms({"all": [p.grad for p in policy.parameters()]})["all"]
            reference.append({k: v.item() for k, v in ref.items()})
            upd.clip_grad_norm_(0.5)
    return reference


def test_clip_is_a_drop_in_for_torch(policy: TinyPolicy, tele: Telemetry) -> None:
    twin = copy.deepcopy(policy)
    backward(policy, seed=3)
    backward(twin, seed=3)
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    with tele.update() as upd:
        got = upd.clip_grad_norm_(0.5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for p, q in zip(policy.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0)  # type: ignore[arg-type]


def test_head_values_are_the_mean_over_the_update_steps(policy: TinyPolicy, tele: Telemetry) -> None:
    ref = _update(tele, policy, steps=3)
    snap = tele.snapshot()
    for head in ("op", "slot"):
        assert snap.head(head).current == pytest.approx(sum(r[head] for r in ref) / 3, rel=1e-9)
    assert snap.grad_norm_pre == pytest.approx(sum(r["total"] for r in ref) / 3, rel=1e-9)
    expected_post = sum(min(r["total"], r["total"] * 0.5 / (r["total"] + 1e-6)) for r in ref) / 3
    assert snap.grad_norm_post == pytest.approx(expected_post, rel=1e-9)
    assert snap.gradient_cv == pytest.approx(sum(gradient_cv([r["op"], r["slot"]]) for r in ref) / 3, rel=1e-9)
    assert snap.steps == 3


def test_prev_is_the_previous_update_and_zero_before_the_second(policy: TinyPolicy, tele: Telemetry) -> None:
    currents = []
    for u in range(4):
        _update(tele, policy, steps=2, scale=1.0 + u, seed=u)
        snap = tele.snapshot()
        head = snap.head("op")
        assert head.prev == (currents[-1] if currents else 0.0)
        currents.append(head.current)
        assert snap.updates == u + 1
    assert tele.snapshot().head("op").trend.arrow == "↗"  # type: ignore[union-attr]


def test_histories_keep_the_last_ten_pre_clip_values(policy: TinyPolicy, tele: Telemetry) -> None:
    """TELE-311's history is pre-clip: a post-clip one is a flat max_norm line that never shows an explosion."""
    pres, kls = [], []
    for u in range(12):
        with tele.update() as upd:
            backward(policy, scale=0.001 * (u + 1), seed=u)
            upd.clip_grad_norm_(0.5)
            upd.observe_kl({"op": torch.full((4,), 0.01 * u)})
        pres.append(tele.snapshot().grad_norm_pre)
        kls.append(tele.snapshot().kl)
    snap = tele.snapshot()
    assert snap.grad_norm_history == tuple(pres[-10:])
    assert snap.kl_history == tuple(kls[-10:])
    assert snap.grad_norm_history[-1] == snap.grad_norm_pre


def test_head_without_gradient_is_missing_and_left_out_of_cv(policy: TinyPolicy, tele: Telemetry) -> None:
    with tele.update() as upd:
        backward(policy, heads=("op",))
        upd.clip_grad_norm_(1.0)
    snap = tele.snapshot()
    assert math.isnan(snap.head("slot").current)
    assert snap.head("slot").trend is None
    assert snap.gradient_cv == 0.0  # a single head with data


def test_nan_gradient_in_one_head_is_counted_and_reported(policy: TinyPolicy, tele: Telemetry) -> None:
    for _ in range(2):
        with tele.update() as upd:
            backward(policy)
            policy.slot.weight.grad[0, 0] = float("nan")  # type: ignore[index]
            upd.clip_grad_norm_(1.0)
            backward(policy)
            upd.clip_grad_norm_(1.0)
    snap = tele.snapshot()
    assert math.isnan(snap.head("slot").current)
    assert snap.head("slot").nonfinite_total == 2
    assert snap.head("op").nonfinite_total == 0
    assert math.isfinite(snap.head("op").current)


def test_kl_is_the_mean_of_the_updates_calls_and_early_stops_count(policy: TinyPolicy, tele: Telemetry) -> None:
    with tele.update() as upd:
        a = upd.observe_kl({"op": torch.full((8,), 0.1)})
        b = upd.observe_kl({"op": torch.full((8,), 0.2)}, {"op": torch.ones(8, dtype=torch.bool)})
        assert isinstance(a, torch.Tensor)
        upd.early_stop()
    snap = tele.snapshot()
    assert snap.kl == pytest.approx((a.item() + b.item()) / 2)
    assert snap.early_stops == 1
    assert snap.steps == 0 and snap.grad_norm_pre is None and snap.gradient_cv is None
    with tele.update():
        pass
    assert tele.snapshot().early_stops == 1


def test_observe_gradients_measures_without_clipping(policy: TinyPolicy, tele: Telemetry) -> None:
    backward(policy, scale=100.0)
    before = [p.grad.clone() for p in policy.parameters()]  # type: ignore[union-attr]
    with tele.update() as upd:
        total = upd.observe_gradients()
    assert all(torch.equal(p.grad, b) for p, b in zip(policy.parameters(), before, strict=True))
    assert tele.snapshot().grad_norm_pre == tele.snapshot().grad_norm_post == pytest.approx(total.item())


def test_histograms_observe_every_step(policy: TinyPolicy, tele: Telemetry) -> None:
    _update(tele, policy, steps=5)
    hist = tele.snapshot().histograms
    assert hist["step_head_grad_norm"][("op", "action")].count == 5
    assert hist["step_policy_grad_norm"][("pre",)].count == 5
    assert hist["step_kl_divergence"][()].count == 0


def test_a_failure_inside_telemetry_is_counted_logged_once_and_training_goes_on(
    policy: TinyPolicy, tele: Telemetry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(max_norm: float | None) -> torch.Tensor:
        raise RuntimeError("injected")

    monkeypatch.setattr(tele._meter, "measure", boom)
    caplog.set_level(logging.WARNING, logger="tele_exporter")
    with tele.update() as upd:
        for _ in range(3):
            backward(policy, scale=100.0)
            pre = upd.clip_grad_norm_(0.5)
            total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in policy.parameters()]))  # type: ignore[union-attr]
            assert total.item() == pytest.approx(0.5, rel=1e-4)  # clipping still happened
            assert pre.item() > 0.5
    assert tele.errors() == {"clip_grad_norm": 3}
    assert len([r for r in caplog.records if "clip_grad_norm" in r.getMessage()]) == 1
    assert tele.snapshot().updates == 1


def test_user_mistakes_raise_at_once_naming_the_culprit(policy: TinyPolicy) -> None:
    with pytest.raises(TypeError, match="head 'op' is a Linear|head 'op' is a int"):
        Telemetry(policy, heads={"op": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="head 'alien' has parameters that are not part of the policy"):
        Telemetry(policy, heads={"alien": nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="non-empty mapping"):
        Telemetry(policy, heads={})
    with pytest.raises(TypeError, match="policy as an nn.Module"):
        Telemetry("policy", heads={"op": policy.op})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="const label 'job'"):
        Telemetry(policy, heads={"op": policy.op}, const_labels={"job": "x"})


def test_unknown_head_and_bad_mask_in_observe_kl(tele: Telemetry) -> None:
    with tele.update() as upd:
        with pytest.raises(ValueError, match="unknown head 'tempo'.*'op', 'slot'"):
            upd.observe_kl({"tempo": torch.zeros(3)})
        with pytest.raises(ValueError, match="mask of head 'slot' has shape"):
            upd.observe_kl({"slot": torch.zeros(3)}, {"slot": torch.zeros(4)})


def test_updates_do_not_nest_and_an_update_is_used_inside_its_block(tele: Telemetry) -> None:
    with tele.update() as upd, pytest.raises(RuntimeError, match="do not nest"):
        tele.update().__enter__()
    with pytest.raises(RuntimeError, match="inside `with tele.update()"):
        upd.observe_gradients()


def test_head_without_parameters_is_allowed_and_always_missing(
    policy: TinyPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tele_exporter")
    tele = Telemetry(policy, heads={"op": policy.op, "noop": nn.Identity()})
    with tele.update() as upd:
        backward(policy)
        upd.clip_grad_norm_(1.0)
    assert math.isnan(tele.snapshot().head("noop").current)
    assert "head 'noop' has no parameters" in caplog.text
    tele.close()


def test_an_update_that_raises_still_publishes_what_it_measured(policy: TinyPolicy, tele: Telemetry) -> None:
    with pytest.raises(KeyError), tele.update() as upd:
        backward(policy)
        upd.clip_grad_norm_(1.0)
        raise KeyError("trainer bug")
    assert tele.snapshot().updates == 1


def test_kl_and_clip_fraction_computed_by_the_trainer_are_published(tele: Telemetry) -> None:
    with tele.update() as upd:
        upd.observe_kl_value(0.02)
        upd.observe_kl_value(torch.tensor(0.04))
        upd.observe_clip_fraction(0.1)
        upd.observe_clip_fraction(torch.tensor(0.3))
    snap = tele.snapshot()
    assert snap.kl == pytest.approx(0.03)
    assert snap.clip_fraction == pytest.approx(0.2)
    with tele.update():
        pass
    assert tele.snapshot().clip_fraction is None  # none reported: not exported, not stale


def _scrape(tele: Telemetry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry's exposition, parsed back by prometheus_client."""
    text = generate_latest(tele.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


class TwoScalars(nn.Module):
    """Two heads of one parameter element each, so a test sets every head norm exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.op = nn.Linear(1, 1, bias=False)
        self.slot = nn.Linear(1, 1, bias=False)


def _steps(tele: Telemetry, net: TwoScalars, grads: list[tuple[float | None, float | None]]) -> None:
    """One update whose steps have these head gradients (None: the head has no gradient)."""
    with tele.update() as upd:
        for op, slot in grads:
            net.op.weight.grad = None if op is None else torch.tensor([[op]])
            net.slot.weight.grad = None if slot is None else torch.tensor([[slot]])
            upd.observe_gradients()


@pytest.fixture
def scalars() -> tuple[TwoScalars, Telemetry]:
    net = TwoScalars()
    return net, Telemetry(net, heads={"op": net.op, "slot": net.slot})


def test_cv_is_the_mean_of_per_step_cvs(scalars: tuple[TwoScalars, Telemetry]) -> None:
    """(1, 3) then (3, 1): each step's CV is 0.707, so the update's is 0.707 ("warn"), not the CV of means (0.0)."""
    net, tele = scalars
    _steps(tele, net, [(1.0, 3.0), (3.0, 1.0)])
    snap = tele.snapshot()
    assert snap.gradient_cv == pytest.approx(math.sqrt(2.0) / 2.0, rel=1e-12)
    assert tele.catalog["gradient_cv"].level_of(snap.gradient_cv).name == "warning"  # type: ignore[arg-type, union-attr]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_heads_agree_and_missing_heads_are_left_out(
    scalars: tuple[TwoScalars, Telemetry], bad: float
) -> None:
    net, tele = scalars
    _steps(tele, net, [(bad, 0.25), (1.0, 3.0)])  # a non-finite head makes its step's CV NaN
    assert math.isnan(tele.snapshot().gradient_cv)  # type: ignore[arg-type]
    _steps(tele, net, [(None, 0.25), (1.0, 3.0)])  # a missing head is left out: CVs 0.0 and 0.707
    assert tele.snapshot().gradient_cv == pytest.approx(math.sqrt(2.0) / 4.0, rel=1e-12)


def test_a_step_whose_measurement_fails_records_nothing(
    policy: TinyPolicy, tele: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed step is missing (no 0.0 for heads or the global norm); torch clips instead; errors count."""
    import tele_exporter.measure.meter as gradients

    def boom(*args: object) -> torch.Tensor:
        raise RuntimeError("injected, like sparse or DTensor gradients")

    twin = copy.deepcopy(policy)
    backward(policy, scale=10.0)
    backward(twin, scale=10.0)
    with monkeypatch.context() as m:
        m.setattr(gradients, "tensor_norms", boom)  # the general path
        m.setattr(gradients.NormRows, "next_row", boom)  # the fast path
        with tele.update() as upd:
            got = upd.clip_grad_norm_(0.5)
            assert math.isnan(upd.observe_gradients().item())
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    snap = tele.snapshot()
    assert snap.steps == 0 and snap.grad_norm_pre is None and snap.gradient_cv is None
    assert all(h.steps == 0 and math.isnan(h.current) for h in snap.heads)
    assert tele.errors() == {"clip_grad_norm": 1, "observe_gradients": 1}
    samples = _scrape(tele)
    assert not any(name in ("tele_policy_grad_norm", "tele_gradient_cv") for name, _ in samples)
    assert samples[("tele_telemetry_errors_total", (("site", "clip_grad_norm"),))] == 1.0
    with tele.update() as upd:  # a later good step is measured as usual, with nothing of the failed one
        backward(policy, seed=1)
        upd.clip_grad_norm_(0.5)
    assert tele.snapshot().steps == 1


def test_sparse_gradients_are_missing_not_zero(tele: Telemetry) -> None:
    """torch's fused norm cannot read sparse gradients: the step is missing and counted, never 0.0."""
    emb = nn.Embedding(5, 3, sparse=True)
    t = Telemetry(emb, heads={"op": emb})
    with t.update() as upd:
        emb(torch.tensor([1, 2])).sum().backward()
        assert math.isnan(upd.observe_gradients().item())
    snap = t.snapshot()
    assert snap.steps == 0 and snap.grad_norm_pre is None and math.isnan(snap.head("op").current)
    assert t.errors() == {"observe_gradients": 1}


def test_an_update_without_a_step_keeps_prev_and_publishes_no_cv(policy: TinyPolicy, tele: Telemetry) -> None:
    first = _update(tele, policy, steps=2, seed=1)
    measured = sum(r["op"] for r in first) / 2
    with tele.update() as upd:  # early stop before the first optimizer step
        upd.observe_kl({"op": torch.full((4,), 0.5)})
        upd.early_stop()
    snap = tele.snapshot()
    assert snap.gradient_cv is None and snap.grad_norm_pre is None
    assert snap.head("op").steps == 0 and math.isnan(snap.head("op").current)
    assert snap.head("op").prev == pytest.approx(measured, rel=1e-9)  # the last measured value, not NaN
    samples = _scrape(tele)
    assert not any(name in ("tele_policy_grad_norm", "tele_gradient_cv") for name, _ in samples)
    op = (("head", "op"), ("kind", "action"))
    assert samples[("tele_head_grad_norm_prev", op)] == pytest.approx(measured, rel=1e-9)
    _update(tele, policy, steps=2, scale=3.0, seed=2)
    head = tele.snapshot().head("op")
    assert head.prev == pytest.approx(measured, rel=1e-9)  # still the last measured value, not NaN
    assert head.trend is not None  # the arrow survives the empty update


def test_clip_error_if_nonfinite_raises_before_touching_gradients(policy: TinyPolicy, tele: Telemetry) -> None:
    backward(policy)
    policy.op.weight.grad[0, 0] = float("inf")  # type: ignore[index]
    before = [p.grad.clone() for p in policy.parameters()]  # type: ignore[union-attr]
    twin = copy.deepcopy(policy)
    for q, b in zip(twin.parameters(), before, strict=True):
        q.grad = b.clone()
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5, error_if_nonfinite=True)
    with tele.update() as upd, pytest.raises(RuntimeError, match="non-finite"):
        upd.clip_grad_norm_(0.5, error_if_nonfinite=True)
    for p, b, q in zip(policy.parameters(), before, twin.parameters(), strict=True):
        assert torch.equal(p.grad, b) and torch.equal(q.grad, b)  # type: ignore[arg-type]
    assert tele.snapshot().steps == 0  # nothing was recorded for the refused step


def test_the_returned_norm_is_the_callers_own(policy: TinyPolicy, tele: Telemetry) -> None:
    backward(policy)
    with tele.update() as upd:
        pre = upd.clip_grad_norm_(0.5)
        value = pre.item()
        pre.zero_()
    # The returned norm is torch's own (float32 sums); the published one sums in float64.
    assert tele.snapshot().grad_norm_pre == pytest.approx(value, rel=1e-6) and value > 0


@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1e6])
@pytest.mark.parametrize("norm_type", [2.0, 2, "2"])
@pytest.mark.parametrize("error_if_nonfinite", [False, True])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_clip_matches_torch_for_every_argument(
    policy: TinyPolicy,
    tele: Telemetry,
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
    foreach: bool | None,
) -> None:
    twin = copy.deepcopy(policy)
    backward(policy, scale=5.0, seed=7)
    backward(twin, scale=5.0, seed=7)
    expected = torch.nn.utils.clip_grad_norm_(
        twin.parameters(), max_norm, float(norm_type), error_if_nonfinite=error_if_nonfinite, foreach=foreach
    )
    with tele.update() as upd:
        got = upd.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite, foreach)  # type: ignore[arg-type]
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for p, q in zip(policy.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_an_update_with_gradients_but_no_measured_step_hints_once(
    policy: TinyPolicy, tele: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tele_exporter")
    with tele.update():
        pass  # no backward pass yet: nothing to hint about
    assert not caplog.records
    for seed in range(3):
        with tele.update():
            backward(policy, seed=seed)
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)  # the user kept torch's clip
    hints = [r for r in caplog.records if "measured no optimizer step" in r.getMessage()]
    assert len(hints) == 1
    assert "upd.clip_grad_norm_" in hints[0].getMessage()
    assert tele.snapshot().grad_norm_pre is None


def test_measured_updates_give_no_hint(policy: TinyPolicy, tele: Telemetry, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tele_exporter")
    _update(tele, policy, steps=2)
    assert not [r for r in caplog.records if "measured no optimizer step" in r.getMessage()]


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_disabled_telemetry_records_nothing_and_training_is_unchanged(
    policy: TinyPolicy, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how == "environment":
        monkeypatch.setenv("TELE_EXPORTER_DISABLED", "1")
    off = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, enabled=False if how == "argument" else None)
    twin = copy.deepcopy(policy)
    assert not off.enabled
    with off.update() as upd:
        backward(policy, seed=4)
        backward(twin, seed=4)
        got = upd.clip_grad_norm_(0.5)
        expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        assert got.item() == expected.item()
        for p, q in zip(policy.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)  # type: ignore[arg-type]
        total = upd.observe_gradients()
        assert total.dtype == torch.float64
        assert total.item() == pytest.approx(torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()]).item())  # type: ignore[misc]
        log_ratio = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
        assert upd.observe_kl({"op": log_ratio}).item() == pytest.approx(
            (log_ratio.exp() - 1 - log_ratio).mean().item()
        )
        assert upd.observe_kl_value(0.25).item() == 0.25
        upd.observe_clip_fraction(0.5)
    watch = off.watch_seed(nn.Linear(2, 2), host=policy, env=0, slot="a")
    assert not watch.active
    assert off.snapshot().updates == 0
    assert generate_latest(off.registry) == b""
    off.close()


def test_environment_zero_or_explicit_enabled_keeps_telemetry_on(
    policy: TinyPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TELE_EXPORTER_DISABLED", "0")
    assert Telemetry(policy, heads={"op": policy.op}).enabled
    monkeypatch.setenv("TELE_EXPORTER_DISABLED", "1")
    assert Telemetry(policy, heads={"op": policy.op}, enabled=True).enabled


def test_disabled_telemetry_still_refuses_misuse(policy: TinyPolicy) -> None:
    off = Telemetry(policy, heads={"op": policy.op}, enabled=False)
    upd = off.update()
    with pytest.raises(RuntimeError, match="inside `with tele.update"):
        upd.clip_grad_norm_(0.5)
    with pytest.raises(TypeError, match="non-empty mapping"):
        Telemetry(policy, heads={}, enabled=False)


def test_kl_is_the_mean_of_every_observe_call_of_the_update(tele: Telemetry) -> None:
    log_ratio = torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64)
    k3 = float((log_ratio.exp() - 1 - log_ratio).mean())
    with tele.update() as upd:
        upd.observe_kl_value(torch.tensor(0.01))
        upd.observe_kl_value(0.02)
        upd.observe_kl({"op": log_ratio})
    assert tele.snapshot().kl == pytest.approx((0.01 + 0.02 + k3) / 3, rel=1e-7)


@pytest.mark.parametrize("negative", [torch.tensor(-0.004), -0.004, torch.tensor(-math.inf)])
def test_a_negative_kl_is_counted_flagged_and_missing_never_shown_as_zero(
    tele: Telemetry, negative: float | torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tele_exporter")
    for _ in range(2):
        with tele.update() as upd:
            upd.observe_kl_value(0.01)
            upd.observe_kl_value(negative)
    snap = tele.snapshot()
    assert snap.kl is None and snap.kl_history == ()
    assert tele.errors() == {"negative_kl": 2}
    assert snap.histograms["step_kl_divergence"][()].count == 0
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(tele.registry).decode())}
    assert not families["tele_kl_divergence"].samples
    (sample,) = [s for s in families["tele_telemetry_errors"].samples if s.name.endswith("_total")]
    assert sample.labels["site"] == "negative_kl" and sample.value == 2
    (hint,) = [r for r in caplog.records if "negative" in r.getMessage()]
    assert "exp(r) - 1 - r" in hint.getMessage() and "old_logp - new_logp" in hint.getMessage()


def test_float32_rounding_below_zero_is_zero_not_an_error(tele: Telemetry) -> None:
    with tele.update() as upd:
        upd.observe_kl_value(torch.tensor(-3e-8, dtype=torch.float32))
        upd.observe_kl_value(torch.tensor(math.nan))
    assert tele.errors() == {}
    with tele.update() as upd:
        upd.observe_kl_value(torch.tensor(-3e-8, dtype=torch.float32))
    assert tele.snapshot().kl == 0.0


def test_a_host_block_on_two_devices_is_added_up_after_the_copy_and_the_parts_around_it_stay_in_place() -> None:
    """to_host: one vector per device per block (two CPU vectors stand in for two devices), amid gains and policy."""
    from tele_exporter.measure.seed_probes import BackwardPass, HostPasses
    from tele_exporter.telemetry.fold import Recorded, to_host
    from tele_exporter.telemetry.policy_record import PolicyRecorder

    f64 = torch.float64
    block = HostPasses(
        seeds=((("0", "a"),), (("0", "a"), ("0", "b"))),
        numels=((10, 2), (10, 2, 3)),
        squares=(torch.arange(1.0, 6.0, dtype=f64), 10 * torch.arange(1.0, 6.0, dtype=f64)),
    )
    gains = {("0", "a"): [BackwardPass([torch.tensor(2.0)], [torch.tensor(4.0)])]}
    recorder = PolicyRecorder(())
    recorder.observe_entropy_value(7.0)
    recorded = Recorded(None, [torch.tensor(0.5)], [], recorder, gains, [block], False, 0)
    host = to_host(recorded)
    assert host.kls == [0.5] and host.gains[("0", "a")] == [0.5]
    (seeds_1, numels_1, sums_1), (seeds_2, numels_2, sums_2) = host.host_passes
    assert (seeds_1, numels_1, list(sums_1)) == ((("0", "a"),), (10, 2), [11.0, 22.0])
    assert (seeds_2, numels_2, list(sums_2)) == ((("0", "a"), ("0", "b")), (10, 2, 3), [33.0, 44.0, 55.0])
    assert host.policy.flat.tolist()[-1:] == [7.0] and recorder.unpack(host.policy).entropies[0][1] == [7.0]


def test_a_run_that_moves_its_levels_pages_on_them_unless_it_says_otherwise(policy: TinyPolicy) -> None:
    """scale defaults to 'run', or to 'records' when the run sets its own thresholds: levels it set must page."""
    heads = {"op": policy.op}
    assert Telemetry(policy, heads).snapshot().alert_scale == "run"
    moved = Telemetry(policy, heads, thresholds={"kl_divergence": {"warning": 0.02}})
    assert moved.snapshot().alert_scale == "records"
    assert (
        Telemetry(policy, heads, thresholds={"kl_divergence": {"warning": 0.02}}, scale="run").snapshot().alert_scale
        == "run"
    )
    with pytest.raises(ValueError, match="scale must be one of"):
        Telemetry(policy, heads, scale="own")
