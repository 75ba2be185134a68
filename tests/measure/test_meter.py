"""GradientMeter: row-slice heads and other groups measured in the one fused pass, against float64 references."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tele_exporter import Telemetry
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
