"""hooks: TELE-557 seed probes measure the backward gain; handles remove themselves, idempotently."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from tele_exporter import Telemetry

from .conftest import TinyPolicy


class Host(nn.Module):
    """A host layer with a seed blended in residually, as in morphogenetic training."""

    def __init__(self, seed: nn.Module) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.seed = seed
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(h + self.seed(h))


class InPlaceSeed(nn.Module):
    """A seed that modifies its input in place: a classic full-backward-hook pitfall."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y.mul_(3.0)


def _reference_ratio(host: Host, x: torch.Tensor) -> float:
    """|dL/d input| / |dL/d output| of the seed, computed with autograd.grad directly."""
    h = torch.relu(host.inp(x))
    y = host.seed(h)
    loss = host.out(h.detach() + y).sum()
    g_in, g_out = torch.autograd.grad(loss, [h, y])
    return (g_in.norm() / g_out.norm()).item()


@pytest.fixture
def setup() -> tuple[TinyPolicy, Telemetry, Host]:
    torch.manual_seed(0)
    policy = TinyPolicy()
    tele = Telemetry(policy, heads={"op": policy.op})
    return policy, tele, Host(nn.Linear(8, 8))


def _train(tele: Telemetry, host: Host, x: torch.Tensor) -> None:
    with tele.update():
        host.zero_grad()
        host(x).sum().backward()


def test_ratio_matches_autograd_reference(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, host = setup
    x = torch.randn(16, 4)
    expected = _reference_ratio(host, x)
    tele.watch_seed(host.seed, env=0, slot="r0c0")
    _train(tele, host, x)
    seed = tele.snapshot().seed("0", "r0c0")
    assert seed.ratio == pytest.approx(expected, rel=1e-6)
    assert seed.passes == 1
    assert seed.vanishing == (0 < seed.ratio < 0.5) and seed.exploding == (seed.ratio > 2.0)


def test_flags_follow_the_catalog_levels(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, host = setup
    with torch.no_grad():
        host.seed.weight.mul_(100.0)  # type: ignore[operator]
    tele.watch_seed(host.seed, env=1, slot="a")
    _train(tele, host, torch.randn(16, 4))
    seed = tele.snapshot().seed("1", "a")
    assert seed.ratio > 2.0 and seed.exploding and not seed.vanishing
    assert seed.shown.label == "▲ EXPLODING"


def test_in_place_op_inside_the_seed(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, _ = setup
    host = Host(InPlaceSeed())
    x = torch.randn(16, 4)
    expected = _reference_ratio(host, x)
    tele.watch_seed(host.seed, env=0, slot="s")
    _train(tele, host, x)
    assert tele.snapshot().seed("0", "s").ratio == pytest.approx(expected, rel=1e-6)


def test_seed_whose_input_does_not_require_grad_reports_no_data(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, _ = setup
    seed = nn.Linear(4, 1)
    tele.watch_seed(seed, env=0, slot="first")
    with tele.update():
        seed(torch.randn(3, 4)).sum().backward()  # raw data: no gradient reaches the input
    state = tele.snapshot().seed("0", "first")
    assert state.ratio == 0.0 and state.shown.label == "OK"
    assert not state.vanishing  # 0.0 is "no data", never vanishing


def test_seed_without_backward_reports_no_data(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, host = setup
    tele.watch_seed(host.seed, env=0, slot="r")
    with tele.update(), torch.no_grad():
        host(torch.randn(2, 4))
    assert tele.snapshot().seed("0", "r").ratio == 0.0


def test_remove_is_idempotent_leaves_no_hooks_and_drops_the_series(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, host = setup
    watch = tele.watch_seed(host.seed, env=0, slot="r0c1")
    assert host.seed._forward_hooks and host.seed._forward_pre_hooks
    assert [(s.env, s.slot) for s in tele.snapshot().seeds] == [("0", "r0c1")]
    watch.remove()
    watch.remove()
    assert not host.seed._forward_hooks and not host.seed._forward_pre_hooks
    assert tele.snapshot().seeds == ()
    assert not watch.active
    with tele.watch_seed(host.seed, env=0, slot="r0c1") as again:
        assert again.active
    assert not host.seed._forward_hooks and tele.snapshot().seeds == ()


def test_watching_the_same_slot_twice_is_a_user_error(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, host = setup
    tele.watch_seed(host.seed, env=0, slot="x")
    with pytest.raises(ValueError, match="env='0' slot='x'"):
        tele.watch_seed(nn.Linear(2, 2), env=0, slot="x")
    with pytest.raises(TypeError, match="nn.Module"):
        tele.watch_seed("seed", env=0, slot="y")  # type: ignore[arg-type]


def test_seed_cap_refuses_and_counts(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    policy, _, host = setup
    tele = Telemetry(policy, heads={"op": policy.op}, max_seeds=1)
    tele.watch_seed(host.seed, env=0, slot="a")
    refused = tele.watch_seed(nn.Linear(2, 2), env=0, slot="b")
    assert not refused.active
    refused.remove()
    assert tele.snapshot().seeds_refused == 1
    assert [s.slot for s in tele.snapshot().seeds] == ["a"]


def test_an_exception_inside_a_seed_hook_is_counted_and_backward_goes_on(
    setup: tuple[TinyPolicy, Telemetry, Host], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, tele, host = setup
    import tele_exporter.hooks as hooks

    def boom(grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected")

    monkeypatch.setattr(hooks, "_sq_norm", boom)
    caplog.set_level(logging.WARNING, logger="tele_exporter")
    tele.watch_seed(host.seed, env=0, slot="r")
    for _ in range(2):
        _train(tele, host, torch.randn(4, 4))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in host.parameters())
    assert tele.errors()["seed_hook"] == 4  # two hooks a pass, two passes
    assert caplog.text.count("seed_hook") == 1
    assert tele.snapshot().seed("0", "r").ratio == 0.0


def test_nonfinite_seed_gradients_are_data(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, host = setup
    with torch.no_grad():
        host.seed.weight[0, 0] = float("inf")  # type: ignore[index]
    tele.watch_seed(host.seed, env=0, slot="r")
    _train(tele, host, torch.randn(4, 4))
    assert not math.isfinite(tele.snapshot().seed("0", "r").ratio)


def test_a_seed_that_modifies_its_input_in_place_is_measured_from_its_second_pass(
    setup: tuple[TinyPolicy, Telemetry, Host],
) -> None:
    """A hook on a view is dropped when the view is modified in place; the probe then copies."""

    class Tripler(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return z.mul_(3.0)

    _, tele, _ = setup
    lin, seed, out = nn.Linear(4, 4), Tripler(), nn.Linear(4, 1)
    tele.watch_seed(seed, env=0, slot="t")
    with tele.update():
        out(seed(lin(torch.randn(5, 4)))).sum().backward()
    assert tele.snapshot().seed("0", "t").ratio == 0.0  # first pass: no data, and now detected
    with tele.update():
        out(seed(lin(torch.randn(5, 4)))).sum().backward()
    assert tele.snapshot().seed("0", "t").ratio == pytest.approx(3.0)
