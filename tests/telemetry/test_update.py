"""Update: one class for both modes (disabled is a switch, not a mirror), and a clip that behaves like torch's."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tele_exporter import Telemetry, Update

from ..conftest import TinyPolicy, backward

T = torch.tensor


def _calls() -> list[tuple[str, Callable[[Update], Any]]]:
    """The same calls, good and bad, for both modes: every argument check must answer alike."""
    lr = T([0.1, -0.2, 0.05, 0.0])
    mask = T([True, True, False, True])
    return [
        ("clip", lambda u: u.clip_grad_norm_(0.5)),
        ("clip norm_type inf", lambda u: u.clip_grad_norm_(0.5, norm_type=float("inf"))),
        ("clip norm_type 1", lambda u: u.clip_grad_norm_(0.5, norm_type=1.0)),
        ("clip foreach=False", lambda u: u.clip_grad_norm_(0.5, foreach=False)),
        ("observe_gradients", lambda u: u.observe_gradients()),
        ("observe_gradients max_norm", lambda u: u.observe_gradients(0.1)),
        ("kl", lambda u: u.observe_kl({"op": lr}, {"op": mask})),
        ("kl unknown head", lambda u: u.observe_kl({"critic": lr})),
        ("kl unknown mask head", lambda u: u.observe_kl({"op": lr}, {"critic": mask})),
        ("kl mask shape", lambda u: u.observe_kl({"op": lr}, {"op": mask[:2]})),
        ("kl not a tensor", lambda u: u.observe_kl({"op": [0.1, 0.2]})),  # type: ignore[dict-item]
        ("kl value", lambda u: u.observe_kl_value(0.01)),
        ("clip fraction", lambda u: u.observe_clip_fraction(0.1)),
        ("entropy", lambda u: u.observe_entropy({"op": T([1.0, 1.2, 0.9, 1.1])})),
        ("entropy unknown head", lambda u: u.observe_entropy({"critic": T([1.0])})),
        ("entropy value", lambda u: u.observe_entropy_value(1.3)),
        ("ev", lambda u: u.observe_explained_variance(T([1.0, 2.0, 3.0]), T([1.5, 2.0, 2.5]))),
        ("ev lengths", lambda u: u.observe_explained_variance(T([1.0, 2.0]), T([1.5, 2.0, 2.5]))),
        ("ev value", lambda u: u.observe_explained_variance_value(0.5)),
        ("advantages", lambda u: u.observe_advantages(T([0.5, -1.0, 0.3]))),
        ("advantages mask shape", lambda u: u.observe_advantages(T([0.5, -1.0, 0.3]), T([True]))),
        ("ratios", lambda u: u.observe_ratios({"op": lr})),
        ("ratios clip_eps", lambda u: u.observe_ratios({"op": lr}, clip_eps=1.5)),
        ("ratios unknown head", lambda u: u.observe_ratios({"critic": lr})),
        ("ratio max value", lambda u: u.observe_ratio_max_value({"op": T([1.25])})),
        ("ratio max value unknown head", lambda u: u.observe_ratio_max_value({"critic": 1.25})),
        ("ratio max value bare", lambda u: u.observe_ratio_max_value(T([1.25]))),  # type: ignore[arg-type]
        ("ratio max value vector", lambda u: u.observe_ratio_max_value({"op": T([1.25, 1.5])})),
        ("action std value", lambda u: u.observe_action_std_value(T([0.6]))),
        ("action std value vector", lambda u: u.observe_action_std_value(T([0.6, 0.7]))),
    ]


def _outcome(tele: Telemetry, policy: TinyPolicy, call: Callable[[Update], Any]) -> tuple[str, Any]:
    backward(policy, seed=5)
    with tele.update() as upd:
        try:
            value = call(upd)
        except Exception as exc:  # the outcome to compare: the error's type and message
            return type(exc).__name__, str(exc)
    return "ok", None if value is None else round(float(value), 6)


@pytest.mark.parametrize(("name", "call"), _calls(), ids=[name for name, _ in _calls()])
def test_a_disabled_update_answers_every_call_as_the_enabled_one_does(name: str, call: Callable[[Update], Any]) -> None:
    """Same argument checks, same errors, same returned values; only recording differs."""
    torch.manual_seed(0)
    policy = TinyPolicy()
    twin = copy.deepcopy(policy)
    heads = {"op": policy.op, "slot": policy.slot}
    on = Telemetry(policy, heads=heads)
    off = Telemetry(twin, heads={"op": twin.op, "slot": twin.slot}, enabled=False)
    try:
        assert _outcome(off, twin, call) == _outcome(on, policy, call)
    finally:
        on.close()
        off.close()


def test_a_disabled_update_records_nothing() -> None:
    policy = TinyPolicy()
    tele = Telemetry(policy, heads={"op": policy.op}, enabled=False)
    with tele.update() as upd:
        backward(policy)
        upd.clip_grad_norm_(0.5)
        upd.observe_kl({"op": T([0.1, 0.2])})
        upd.observe_entropy({"op": T([1.0, 1.1])})
        assert upd.kls == [] and upd.policy.entropies == [] and upd.measure_calls == 0
    assert tele.snapshot().updates == 0


def test_the_clip_returns_a_norm_outside_the_graph_after_create_graph(policy: TinyPolicy, tele: Telemetry) -> None:
    """torch's clip runs under no_grad; so does ours: no requires_grad result, no graph held by the row buffer."""
    with tele.update() as upd:
        out = policy(torch.randn(8, 6))
        loss = sum(o.pow(2).mean() for o in out)
        loss.backward(create_graph=True)  # type: ignore[union-attr]
        assert any(p.grad is not None and p.grad.requires_grad for p in policy.parameters())
        pre = upd.clip_grad_norm_(0.5)
        assert not pre.requires_grad and pre.grad_fn is None
        buffers = [rows.buffer for rows in tele._meter._norm_rows.values()]
        assert buffers and all(not b.requires_grad and b.grad_fn is None for b in buffers)
        observed = upd.observe_gradients()
        assert not observed.requires_grad
    policy.zero_grad(set_to_none=True)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_the_clip_honours_foreach_like_torch(policy: TinyPolicy, tele: Telemetry, foreach: bool | None) -> None:
    twin = copy.deepcopy(policy)
    backward(policy, seed=9)
    backward(twin, seed=9)
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1, foreach=foreach)
    with tele.update() as upd:
        got = upd.clip_grad_norm_(0.1, foreach=foreach)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for p, q in zip(policy.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0)  # type: ignore[arg-type]
    assert tele.errors() == {}


def test_foreach_on_a_device_without_foreach_kernels_falls_back_or_raises_as_torch_does() -> None:
    """The meta device has no foreach kernels: foreach=None falls back per tensor, foreach=True raises torch's error."""
    policy = torch.nn.Linear(3, 2, device="meta")
    for p in policy.parameters():
        p.grad = torch.empty_like(p)
    tele = Telemetry(policy, heads={"all": policy})
    with tele.update() as upd:
        assert upd.clip_grad_norm_(1.0).device.type == "meta"  # fell back, nothing raised
        with pytest.raises(RuntimeError) as ours:
            upd.clip_grad_norm_(1.0, foreach=True)
        assert tele.errors() == {}  # the caller's own error, not a telemetry failure
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0, foreach=True)
    assert str(ours.value) == str(theirs.value)
    tele.close()  # (the publish cannot copy meta tensors to the host; that is the stand-in's limit, not ours)


class _TwoDtypes(torch.nn.Module):
    """Two heads, one in float64: the meter's general path (more than one dtype), or float32 alone."""

    def __init__(self, mixed: bool) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 4)
        self.b = torch.nn.Linear(6, 3).to(torch.float64 if mixed else torch.float32)

    def backward(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 6, generator=gen)
        self.zero_grad(set_to_none=True)
        loss = self.a(x).pow(2).mean() + self.b(x.to(self.b.weight.dtype)).pow(2).mean().float()
        (50.0 * loss).backward()


@pytest.mark.parametrize("mixed", [False, True], ids=["one dtype", "float32 and float64"])
def test_observe_gradients_with_max_norm_touches_nothing_and_publishes_what_that_clip_leaves(mixed: bool) -> None:
    """For a library that clips by global norm itself: pre is the norm before, post what torch's clip leaves."""
    torch.manual_seed(0)
    policy = _TwoDtypes(mixed)
    twin = copy.deepcopy(policy)
    tele = Telemetry(policy, heads={"a": policy.a, "b": policy.b})
    pres, posts = [], []
    with tele.update() as upd:
        for seed in (1, 2):
            policy.backward(seed)
            twin.backward(seed)
            before = [p.grad.clone() for p in policy.parameters()]  # type: ignore[union-attr]
            upd.observe_gradients(0.1)
            assert all(torch.equal(p.grad, b) for p, b in zip(policy.parameters(), before, strict=True))
            pres.append(torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1).item())
            posts.append(torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()]).item())
    snap = tele.snapshot()
    assert min(pres) > 0.1  # the clip did scale
    assert snap.grad_norm_pre == pytest.approx(sum(pres) / 2, rel=1e-6)
    assert snap.grad_norm_post == pytest.approx(sum(posts) / 2, rel=1e-5)
    assert tele.errors() == {}
    tele.close()
