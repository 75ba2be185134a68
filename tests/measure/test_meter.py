"""GradientMeter: row-slice heads and other groups measured in the one fused pass, against float64 references."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import tele_exporter.measure.meter as meter_module
from tele_exporter import Telemetry
from tele_exporter.measure.dispatch_counter import DispatchCounter
from tele_exporter.measure.heads import resolve_heads
from tele_exporter.measure.meter import GradientMeter

from ..conftest import TinyPolicy, backward


def _rows_norm(module: torch.nn.Linear, start: int, stop: int) -> float:
    """Float64 norm of rows [start, stop) of a linear layer's weight and bias gradients."""
    assert module.weight.grad is not None and module.bias.grad is not None
    parts = [module.weight.grad[start:stop].double().flatten(), module.bias.grad[start:stop].double()]
    return float(torch.cat(parts).norm())


def _norm(params: Iterator[torch.nn.Parameter]) -> float:
    """Float64 norm of every gradient present among `params`."""
    return float(torch.cat([p.grad.double().flatten() for p in params if p.grad is not None]).norm())


def _meter(policy: TinyPolicy) -> GradientMeter:
    heads = resolve_heads(
        {"a": (policy.op, slice(0, 3)), "b": (policy.op, slice(3, 4)), "ab": (policy.op, slice(1, 4))},
        {"op": policy.op, "value": policy.value},
    )
    return GradientMeter(list(policy.parameters()), heads)


def test_slices_are_the_norms_of_their_rows(policy: TinyPolicy) -> None:
    meter = _meter(policy)
    backward(policy, seed=3)
    pre = meter.measure(None)
    drained = meter.drain()
    assert drained is not None
    row = drained.rows[0].tolist()
    expected = [_rows_norm(policy.op, 0, 3), _rows_norm(policy.op, 3, 4), _rows_norm(policy.op, 1, 4)]
    expected += [_rows_norm(policy.op, 0, 4), _norm(policy.value.parameters())]
    total = _norm(policy.parameters())
    assert row == pytest.approx([*expected, total, total], rel=1e-6)
    assert float(pre) == pytest.approx(total, rel=1e-6)
    assert drained.present == [(True,) * 5]


def test_all_heads_come_from_one_foreach_norm_call(policy: TinyPolicy, monkeypatch: pytest.MonkeyPatch) -> None:
    meter = _meter(policy)
    backward(policy)
    calls: list[int] = []
    real = torch._foreach_norm

    def counting(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(tensors))
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    meter.measure(0.5)
    assert calls == [8 + 3 * 2]  # the 8 gradients, then rows of op's weight and bias for each of 3 slices


def test_a_slice_without_gradient_is_missing_and_clipping_scales_every_row(policy: TinyPolicy) -> None:
    meter = _meter(policy)
    backward(policy, heads=("slot",))  # op gets no gradient
    for p in policy.op.parameters():
        p.grad = None
    expected = _norm(policy.parameters())
    meter.measure(0.01)
    drained = meter.drain()
    assert drained is not None and drained.present == [(False, False, False, False, True)]
    assert drained.rows[0, -2].item() == pytest.approx(expected, rel=1e-6)
    clipped = _norm(policy.parameters())
    assert clipped == pytest.approx(0.01, rel=1e-4)


def test_nan_in_one_slice_leaves_the_other_slice_finite(policy: TinyPolicy) -> None:
    tele = Telemetry(policy, heads={"a": (policy.op, slice(0, 3)), "b": (policy.op, slice(3, 4))})
    with tele.update() as upd:
        backward(policy)
        assert policy.op.weight.grad is not None
        policy.op.weight.grad[3, 0] = math.nan
        upd.observe_gradients()
    snap = tele.snapshot()
    assert math.isfinite(snap.head("a").current) and math.isnan(snap.head("b").current)
    assert (snap.head("a").nonfinite_total, snap.head("b").nonfinite_total) == (0, 1)
    tele.close()


# --- counted, not timed: the per-step contract of "as cheap as torch's clip" -----------------


def _bench_policy(heads: int, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Telemetry, torch.Tensor]:
    """A small factored policy (trunk, `heads` action heads, a value head) and its Telemetry."""
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh())
    action = torch.nn.ModuleList(torch.nn.Linear(32, 4) for _ in range(heads))
    value = torch.nn.Linear(32, 1)
    policy = torch.nn.ModuleDict({"trunk": trunk, "heads": action, "value": value}).to(dtype)
    tele = Telemetry(policy, heads={f"h{i}": m for i, m in enumerate(action)}, groups={"value": value})
    return policy, tele, torch.randn(8, 16, dtype=dtype)


def _backward(policy: torch.nn.Module, x: torch.Tensor) -> None:
    policy.zero_grad(set_to_none=True)
    z = policy["trunk"](x)  # type: ignore[index]
    loss = sum(h(z).logsumexp(-1).mean() for h in policy["heads"]) + policy["value"](z).pow(2).mean()  # type: ignore[index]
    loss.backward()  # type: ignore[union-attr]


def _counted(fn: Any) -> DispatchCounter:
    with DispatchCounter() as counter:
        fn()
    return counter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("heads", [8, 64])
def test_a_steady_clip_launches_no_more_than_torchs_and_reads_nothing(heads: int, dtype: torch.dtype) -> None:
    policy, tele, x = _bench_policy(heads, dtype)
    twin = copy.deepcopy(policy)
    with tele.update() as upd:
        for step in range(3):  # the first step builds the plan; later ones are the steady state
            _backward(policy, x)
            _backward(twin, x)
            ours = _counted(lambda: upd.clip_grad_norm_(0.5))
            theirs = _counted(lambda: torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5))
            if step:
                assert ours.launches <= theirs.launches == 8, (ours.ops, theirs.ops)
                assert ours.reads == 0
    for p, q in zip(policy.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)  # type: ignore[arg-type]


def test_observe_gradients_launches_at_most_one_more_than_get_total_norm() -> None:
    policy, tele, x = _bench_policy(8)
    with tele.update() as upd:
        for _ in range(2):
            _backward(policy, x)
            ours = _counted(upd.observe_gradients)
        grads = [p.grad for p in policy.parameters() if p.grad is not None]
        theirs = _counted(lambda: torch.nn.utils.get_total_norm(grads))
    assert ours.launches <= theirs.launches + 1 and ours.reads == 0


def test_row_slice_heads_cost_no_extra_launch(policy: TinyPolicy) -> None:
    tele = Telemetry(policy, heads={"a": (policy.op, slice(0, 2)), "b": (policy.op, slice(2, 4))})
    with tele.update() as upd:
        for _ in range(2):
            backward(policy)
            ours = _counted(lambda: upd.clip_grad_norm_(0.5))
    assert ours.launches <= 8 and ours.reads == 0


def test_the_per_tensor_norms_are_folded_every_fold_rows_steps_into_the_general_paths_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Memory is bounded (FOLD_ROWS held rows); the fast path's published values equal the general path's."""
    monkeypatch.setattr(meter_module, "FOLD_ROWS", 8)
    fast_policy, fast, x = _bench_policy(3)
    slow_policy = copy.deepcopy(fast_policy)
    slow = Telemetry(
        slow_policy,
        heads={f"h{i}": m for i, m in enumerate(slow_policy["heads"])},  # type: ignore[index, arg-type]
        groups={"value": slow_policy["value"]},  # type: ignore[index]
    )
    with fast.update() as f, slow.update() as s:
        for step in range(21):
            _backward(fast_policy, x * (1 + step))
            _backward(slow_policy, x * (1 + step))
            if step % 4 == 3:  # observe_gradients steps too: their post-clip is their pre-clip
                f.observe_gradients()
                s._meter.measure(None, foreach=False)  # the general path: per-step float64 sums
                s.measure_calls += 1
            else:
                f.clip_grad_norm_(0.5)
                s.clip_grad_norm_(0.5, foreach=False)
        rows = next(iter(fast._meter._norm_rows.values()))
        assert rows.buffer.shape[0] <= 8 and len(fast._meter._folded) == 2
    a, b = fast.snapshot(), slow.snapshot()
    assert a.steps == b.steps == 21
    assert a.grad_norm_pre == pytest.approx(b.grad_norm_pre, rel=1e-12)
    assert a.grad_norm_post == pytest.approx(b.grad_norm_post, rel=1e-12)
    assert a.gradient_cv == pytest.approx(b.gradient_cv, rel=1e-12)
    for ha, hb in zip(a.heads, b.heads, strict=True):
        assert ha.current == pytest.approx(hb.current, rel=1e-12) and ha.steps == hb.steps
    assert a.histograms == b.histograms


# --- layers: from the same per-tensor norms, at no launch per step ----------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_steady_clip_with_layers_and_update_ratios_still_launches_torchs_eight(dtype: torch.dtype) -> None:
    """Layers on (every module), update ratios on (the default): the per-step clip is still torch's 8 launches."""
    policy, _, x = _bench_policy(8, dtype)
    tele = Telemetry(
        policy,
        heads={f"h{i}": m for i, m in enumerate(policy["heads"])},  # type: ignore[index]
        groups={"value": policy["value"]},  # type: ignore[index]
        layers=True,
    )
    assert len(tele._layers) == 10 and tele._weights is not None
    twin = copy.deepcopy(policy)
    with tele.update() as upd:
        for step in range(3):
            _backward(policy, x)
            _backward(twin, x)
            ours = _counted(lambda: upd.clip_grad_norm_(0.5))
            theirs = _counted(lambda: torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5))
            if step:
                assert ours.launches <= theirs.launches == 8, (ours.ops, theirs.ops)
                assert ours.reads == 0
    assert tele.errors() == {} and all(layer.steps == 3 for layer in tele.snapshot().layers)
    tele.close()


def _layer_reference(module: torch.nn.Module) -> float:
    """Float64 L2 norm of a module's present gradients, computed here from .grad (None: no gradient)."""
    grads = [p.grad.double().flatten() for p in module.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else math.nan


@pytest.mark.parametrize("foreach", [None, False])  # the fast path's fold, and the general path's per-step sums
def test_layer_norms_are_the_float64_norms_of_each_layers_gradients_mean_over_steps(
    policy: TinyPolicy, foreach: bool | None
) -> None:
    tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, groups={"value": policy.value}, layers=True)
    modules = {"trunk": policy.trunk, "op": policy.op, "slot": policy.slot, "value": policy.value}
    per_step: dict[str, list[float]] = {name: [] for name in modules}
    with tele.update() as upd:
        for step in range(4):
            backward(policy, scale=10.0**step, seed=step)  # norms over four orders of magnitude, clipped
            for name, module in modules.items():
                per_step[name].append(_layer_reference(module))  # before the clip scales them
            upd.clip_grad_norm_(0.5, foreach=foreach)
    snap = tele.snapshot()
    assert [layer.name for layer in snap.layers] == list(modules)
    for layer in snap.layers:
        assert layer.steps == 4 and not layer.dead
        assert layer.grad_norm == pytest.approx(math.fsum(per_step[layer.name]) / 4, rel=1e-6), layer.name
    assert snap.dead_layers == 0
    tele.close()


def test_a_dead_layer_is_counted_and_a_layer_without_gradient_is_missing_not_dead(policy: TinyPolicy) -> None:
    """Dead: a gradient below 1e-7 at every step (here exactly 0, and 5e-8); no gradient at all: missing."""
    tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, groups={"value": policy.value}, layers=True)
    with tele.update() as upd:
        for step in range(3):
            backward(policy, seed=step, heads=("op",))  # slot gets no gradient: missing
            assert policy.slot.weight.grad is None
            policy.op.weight.grad.zero_()  # type: ignore[union-attr]
            policy.op.bias.grad.zero_()  # type: ignore[union-attr]
            policy.value.weight.grad.fill_(5e-8 / math.sqrt(16) * (step == 1))  # type: ignore[union-attr]
            policy.value.bias.grad.zero_()  # type: ignore[union-attr]
            upd.observe_gradients()
    snap = tele.snapshot()
    layers = {layer.name: layer for layer in snap.layers}
    assert layers["op"].dead and layers["value"].dead and layers["value"].grad_norm > 0
    assert not layers["trunk"].dead and layers["trunk"].grad_norm > 1e-3
    assert layers["slot"].steps == 0 and math.isnan(layers["slot"].grad_norm) and not layers["slot"].dead
    assert snap.dead_layers == 2
    tele.close()


def test_a_layer_is_dead_only_when_every_step_is_below_the_floor(policy: TinyPolicy) -> None:
    tele = Telemetry(policy, heads={"op": policy.op}, layers={"op": policy.op})
    with tele.update() as upd:
        for step in range(3):
            backward(policy, seed=step)
            if step != 2:
                policy.op.weight.grad.zero_()  # type: ignore[union-attr]
                policy.op.bias.grad.zero_()  # type: ignore[union-attr]
            upd.clip_grad_norm_(0.5)
    assert not tele.snapshot().layers[0].dead and tele.snapshot().dead_layers == 0
    tele.close()
