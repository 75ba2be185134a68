"""The fold's cost, counted: one copy per device, a handful of host reads, ops that do not grow with the heads."""

from __future__ import annotations

import pytest
import torch

import tele_exporter.telemetry.packer as packer_module
from tele_exporter import Telemetry
from tele_exporter.measure.dispatch_counter import DispatchCounter
from tele_exporter.telemetry.fold import rms_ratio


def _run(heads: int, steps: int, layers: bool = False) -> tuple[DispatchCounter, Telemetry]:
    """One update of `steps` clipped steps with KL, entropy, ratio, log-prob and value observations; publish counted."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(8, 16)
    action = torch.nn.ModuleList(torch.nn.Linear(16, 3) for _ in range(heads))
    value = torch.nn.Linear(16, 1)
    policy = torch.nn.ModuleDict({"trunk": trunk, "heads": action, "value": value})
    names = [f"h{i}" for i in range(heads)]
    tele = Telemetry(policy, heads=dict(zip(names, action, strict=True)), groups={"value": value}, layers=layers)
    grads = [torch.randn_like(p) for p in policy.parameters()]
    upd = tele.update().__enter__()
    for step in range(steps):
        for p, g in zip(policy.parameters(), grads, strict=True):  # a gradient per step, without a backward pass
            p.grad = g * (1 + step % 7)
        upd.clip_grad_norm_(0.5)
        if step % 25 == 0:
            lr = {n: torch.randn(4) * 0.01 for n in names}
            upd.observe_kl(lr)
            upd.observe_ratios(lr)
            upd.observe_entropy({n: torch.rand(4) for n in names})
            upd.observe_log_probs({n: -torch.rand(4) for n in names})
    upd.observe_explained_variance(torch.randn(16), torch.randn(16))
    upd.observe_advantages(torch.randn(16))
    with DispatchCounter() as counter:
        upd.__exit__(None, None, None)
    assert tele.errors() == {} and tele.snapshot().steps == steps
    return counter, tele


@pytest.mark.parametrize(("heads", "steps"), [(8, 8), (64, 8), (8, 1000), (64, 1000)])
def test_a_publish_reads_at_most_eight_values_on_the_host(heads: int, steps: int) -> None:
    counter, tele = _run(heads, steps)
    assert counter.reads <= 8, counter.ops
    tele.close()


@pytest.mark.parametrize(("heads", "steps"), [(8, 8), (64, 1000)])
def test_layers_and_update_ratios_add_no_host_read_to_a_publish(heads: int, steps: int) -> None:
    """Every layer of the policy (heads + 2 layers), its ratios and the dead count ride in the same one read."""
    counter, tele = _run(heads, steps, layers=True)
    assert counter.reads <= 8, counter.ops
    snap = tele.snapshot()
    assert len(snap.layers) == heads + 2 and all(layer.steps == steps for layer in snap.layers)
    assert snap.dead_layers == 0 and all(layer.update_ratio == 0.0 for layer in snap.layers)  # no optimizer step
    tele.close()


def test_a_publishs_ops_with_layers_do_not_grow_with_the_layers() -> None:
    small, _ = _run(8, 32, layers=True)
    large, _ = _run(64, 32, layers=True)
    assert sum(large.ops.values()) <= 1.5 * sum(small.ops.values()), (small.ops, large.ops)


def test_a_publishs_ops_do_not_grow_with_the_heads() -> None:
    small, _ = _run(8, 32)
    large, _ = _run(64, 32)
    assert sum(large.ops.values()) <= 1.5 * sum(small.ops.values()), (small.ops, large.ops)


def test_one_gather_per_update(monkeypatch: pytest.MonkeyPatch) -> None:
    gathers: list[int] = []
    real = packer_module.gather
    monkeypatch.setattr(packer_module, "gather", lambda parts: gathers.append(len(parts)) or real(parts))
    _run(8, 8)
    assert len(gathers) == 1


@pytest.mark.parametrize(
    ("seed_sq", "seed_n", "host_sq", "host_n", "expected"),
    [
        (4.0, 4, 16.0, 16, 1.0 / (1.0 + 1e-8)),  # equal RMS: 1
        (0.0, 4, 16.0, 16, 0.0),  # no seed gradient: no data
        (4.0, 4, 0.0, 16, 0.0),  # no host gradient: no data
        (float("inf"), 4, 16.0, 16, float("inf")),  # exploding is data
    ],
)
def test_the_seed_ratio_on_host_floats(
    seed_sq: float, seed_n: int, host_sq: float, host_n: int, expected: float
) -> None:
    assert rms_ratio(seed_sq, seed_n, host_sq, host_n) == pytest.approx(expected, rel=1e-15)
