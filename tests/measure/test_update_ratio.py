"""The update-to-weight ratio: one fused copy when an update opens, nothing per step, float64-true at publish."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import nn

from tele_exporter import Telemetry
from tele_exporter.measure.dispatch_counter import DispatchCounter

from ..conftest import TinyPolicy, backward


def _ratio(after: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    """|after - before| / |before| in float64, computed here from copies the test took itself."""
    delta = torch.cat([(a.double() - b.double()).flatten() for a, b in zip(after, before, strict=True)])
    return float(delta.norm() / torch.cat([b.double().flatten() for b in before]).norm())


def _train(policy: TinyPolicy, tele: Telemetry, steps: int, lr: float = 1e-2) -> list[torch.Tensor]:
    """One update of `steps` Adam steps; returns the parameters as they were when it opened."""
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    before = [p.detach().clone() for p in policy.parameters()]
    with tele.update() as upd:
        for step in range(steps):
            backward(policy, seed=step)
            upd.clip_grad_norm_(0.5)
            opt.step()
    return before


def test_head_and_layer_ratios_match_a_float64_reference(policy: TinyPolicy) -> None:
    tele = Telemetry(
        policy,
        heads={"op": policy.op, "first": (policy.slot, slice(0, 2))},  # a row slice counts only its rows
        groups={"value": policy.value},
        layers={"trunk": policy.trunk, "all": policy},
    )
    for update in range(2):  # the second update's "before" is the first one's "after"
        before = dict(zip((n for n, _ in policy.named_parameters()), _train(policy, tele, 5), strict=True))
        now = dict(policy.named_parameters())
        snap = tele.snapshot()

        def ref(
            *names: str,
            rows: slice = slice(None),
            now: Mapping[str, torch.Tensor] = now,
            before: Mapping[str, torch.Tensor] = before,
        ) -> float:
            return _ratio([now[n].detach()[rows] for n in names], [before[n][rows] for n in names])

        assert snap.head("op").update_ratio == pytest.approx(ref("op.weight", "op.bias"), rel=1e-6), update
        assert snap.head("first").update_ratio == pytest.approx(
            ref("slot.weight", "slot.bias", rows=slice(0, 2)), rel=1e-6
        )
        assert snap.head("value").update_ratio == pytest.approx(ref("value.weight", "value.bias"), rel=1e-6)
        layers = {layer.name: layer.update_ratio for layer in snap.layers}
        assert layers["trunk"] == pytest.approx(ref("trunk.weight", "trunk.bias"), rel=1e-6)
        assert layers["all"] == pytest.approx(ref(*now), rel=1e-6)
        assert 1e-4 < (layers["all"] or 0.0) < 1.0  # 5 Adam steps of 1e-2 on weights of norm ~1
    assert tele.errors() == {}
    tele.close()


def test_the_before_copy_is_one_fused_op_when_the_update_opens_and_steps_gain_nothing(policy: TinyPolicy) -> None:
    with_ratio = Telemetry(policy, heads={"op": policy.op}, layers=True)
    without = Telemetry(policy, heads={"op": policy.op}, layers=True, update_ratio=False)
    for tele in (with_ratio, without):
        upd = tele.update()
        with DispatchCounter() as opened:
            upd.__enter__()
        expected = {"_foreach_copy_": 1} if tele is with_ratio else {}
        assert dict(opened.ops) == expected and opened.reads == 0
        steps = []
        for step in range(3):
            backward(policy, seed=step)
            with DispatchCounter() as counted:
                upd.clip_grad_norm_(0.5)
            steps.append(counted.launches)
        upd.__exit__(None, None, None)
        assert steps[1:] == [8, 8], steps  # torch's clip, with or without the ratio
        tele.close()
    assert without.snapshot().head("op").update_ratio is None
    assert with_ratio.snapshot().head("op").update_ratio == 0.0  # no optimizer step: the weights did not move


def test_weights_all_zero_before_the_update_have_no_ratio(policy: TinyPolicy) -> None:
    nn.init.zeros_(policy.value.weight)
    nn.init.zeros_(policy.value.bias)
    tele = Telemetry(policy, heads={"op": policy.op}, groups={"value": policy.value})
    _train(policy, tele, 2)
    snap = tele.snapshot()
    assert snap.head("value").update_ratio is None  # x / 0 is no measurement: missing, not Inf or 0
    assert (snap.head("op").update_ratio or 0.0) > 0
    tele.close()


def test_nan_weights_after_the_update_give_a_nan_ratio(policy: TinyPolicy) -> None:
    tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot})
    with tele.update() as upd:
        backward(policy)
        upd.clip_grad_norm_(0.5)
        with torch.no_grad():
            policy.op.weight[0, 0] = math.nan
    snap = tele.snapshot()
    assert math.isnan(snap.head("op").update_ratio)  # type: ignore[arg-type]
    assert snap.head("slot").update_ratio == 0.0
    tele.close()


def test_a_disabled_telemetry_copies_nothing(policy: TinyPolicy) -> None:
    tele = Telemetry(policy, heads={"op": policy.op}, enabled=False)
    upd = tele.update()
    with DispatchCounter() as opened:
        upd.__enter__()
    upd.__exit__(None, None, None)
    assert opened.launches == 0 and tele._weights is not None and tele._weights._before is None
    tele.close()


def test_sharded_parameters_have_no_ratio_never_a_shards(tmp_path: Path) -> None:
    """FSDP2 (DTensor) parameters: the ratios are missing (a shard's would lie), layer norms measured, no failure."""
    from torch.distributed.fsdp import fully_shard

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)  # type: ignore[attr-defined]
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        policy = TinyPolicy()
        fully_shard(policy)
        tele = Telemetry(policy, heads={"op": policy.op}, layers={"trunk": policy.trunk})
        with tele.update() as upd:
            backward(policy)
            upd.clip_grad_norm_(0.5)
        snap = tele.snapshot()
        assert snap.head("op").update_ratio is None and snap.layers[0].update_ratio is None
        assert snap.layers[0].steps == 1 and snap.layers[0].grad_norm > 0
        assert tele.errors() == {}
        tele.close()
    finally:
        torch.distributed.destroy_process_group()
