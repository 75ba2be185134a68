"""On CUDA, telemetry adds no host-device synchronisation to an optimizer step."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from tele_exporter import Telemetry

from .conftest import TinyPolicy

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@contextmanager
def _no_sync() -> Iterator[None]:
    """Any synchronising CUDA call inside raises (torch.cuda.set_sync_debug_mode("error"))."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _loss(policy: TinyPolicy, x: torch.Tensor) -> torch.Tensor:
    op, slot, value = policy(x)
    return op.logsumexp(-1).mean() + slot.logsumexp(-1).mean() + value.pow(2).mean()


def test_optimizer_steps_make_no_host_sync() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    policy = TinyPolicy().to(device)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-3, momentum=0.9)
    tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot})
    x = torch.randn(256, 6, device=device)
    log_ratio = {"op": torch.randn(64, device=device) * 0.01, "slot": torch.randn(64, device=device) * 0.01}
    masks = {"op": torch.ones(64, device=device), "slot": (torch.arange(64, device=device) % 2).float()}
    try:
        torch.cuda.synchronize()
        with tele.update() as upd, _no_sync():
            for _ in range(80):  # the first step builds the meter's plan; step 65 grows its buffer
                _loss(policy, x).backward()
                pre = upd.clip_grad_norm_(0.5)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            kl = upd.observe_kl(log_ratio, masks)
            unmasked = upd.observe_kl(log_ratio)
            assert pre.device.type == "cuda" and kl.device.type == "cuda"
        snap = tele.snapshot()
        assert snap.steps == 80
        assert math.isfinite(snap.grad_norm_pre) and snap.grad_norm_post <= 0.5 + 1e-6
        assert math.isfinite(snap.head("op").current) and math.isfinite(snap.head("slot").current)
        assert snap.kl == pytest.approx((float(kl) + float(unmasked)) / 2)
    finally:
        tele.close()


def test_row_slice_heads_and_groups_make_no_host_sync() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    policy = TinyPolicy().to(device)
    heads = {"move": (policy.op, slice(0, 3)), "fire": (policy.op, slice(3, 4)), "slot": policy.slot}
    tele = Telemetry(policy, heads=heads, groups={"value": policy.value})
    x = torch.randn(256, 6, device=device)
    try:
        torch.cuda.synchronize()
        with tele.update() as upd, _no_sync():
            for _ in range(3):
                policy.zero_grad(set_to_none=True)
                _loss(policy, x).backward()
                upd.clip_grad_norm_(0.5)
        w, b = policy.op.weight.grad, policy.op.bias.grad  # no optimizer step: all three steps' gradients are equal
        assert w is not None and b is not None
        fire = float(torch.cat([w[3:].double().flatten(), b[3:].double()]).norm())
        snap = tele.snapshot()
        assert snap.steps == 3 and snap.head("value").kind == "other"
        assert math.isfinite(snap.head("move").current) and snap.head("fire").current > 0
        assert fire == pytest.approx(snap.head("fire").current * min(1.0, 0.5 / (snap.grad_norm_pre + 1e-6)), rel=1e-5)
    finally:
        tele.close()


def test_policy_health_observations_make_no_host_sync() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    policy = TinyPolicy().to(device)
    tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, action_sizes={"op": 4, "slot": 3})
    ent = {"op": torch.rand(64, device=device), "slot": torch.rand(64, device=device)}
    masks = {"op": torch.ones(64, device=device), "slot": (torch.arange(64, device=device) % 2).float()}
    log_ratio = {"op": torch.randn(64, device=device) * 0.1, "slot": torch.randn(64, device=device) * 0.1}
    values, returns = torch.randn(64, device=device), torch.randn(64, device=device)
    try:
        torch.cuda.synchronize()
        with tele.update() as upd:
            with _no_sync():
                for _ in range(8):  # one call per minibatch, as trainers make them
                    joint = upd.observe_entropy(ent, masks)
                    fraction = upd.observe_ratios(log_ratio, masks)
                ev = upd.observe_explained_variance(values, returns)
                std = upd.observe_advantages(returns, masks["slot"])
                upd.observe_ratio_max_value({"op": log_ratio["op"].float().exp().max()})  # a library's own, float32
                action_std = upd.observe_action_std_value(values[:2].float().exp().mean())
            assert {t.device.type for t in (joint, fraction, ev, std, action_std)} == {"cuda"}
        policy_state = tele.snapshot().policy
        assert policy_state.entropy is not None and math.isfinite(policy_state.entropy)
        assert set(policy_state.head_entropy) == {"op", "slot"} and set(policy_state.head_ratio_max) == {"op", "slot"}
        assert policy_state.explained_variance is not None and policy_state.advantage_std is not None
        assert policy_state.action_std is not None and math.isfinite(policy_state.action_std)
    finally:
        tele.close()


class _SeededHost(torch.nn.Module):
    """Two hidden layers, each followed by a residual seed: the shape benchmarks/seed_overhead.py times."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))
        self.seeds = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.ReLU(), torch.nn.Linear(4, 16)) for _ in range(2)
        )
        self.out = torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, seed in zip(self.layers, self.seeds, strict=True):
            x = torch.tanh(layer(x))
            x = x + 0.5 * seed(x)
        out: torch.Tensor = self.out(x)
        return out


def _rms_ratio64(host: _SeededHost, seed: torch.nn.Module) -> float:
    """TELE-557 from the .grad tensors in float64 on the host: seed RMS over host RMS."""
    seed_ids = {id(p) for s in host.seeds for p in s.parameters()}
    own = [p.grad.double().cpu() for p in host.parameters() if id(p) not in seed_ids and p.grad is not None]
    mine = [p.grad.double().cpu() for p in seed.parameters() if p.grad is not None]
    g_host = math.sqrt(sum(float(g.pow(2).sum()) for g in own))
    g_seed = math.sqrt(sum(float(g.pow(2).sum()) for g in mine))
    n_host = sum(g.numel() for g in own)
    n_seed = sum(g.numel() for g in mine)
    return (g_seed / math.sqrt(n_seed)) / (g_host / math.sqrt(n_host) + 1e-8)


def test_seed_ratios_make_no_host_sync_on_fresh_and_accumulating_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of TELE-557's probe: fresh .grad read at the end of the pass, and gradients normed in their hooks.

    Passes are summed two at a time, so the fold of their norms runs inside the no-sync block too.
    """
    import tele_exporter.measure.seed_probes as hooks

    monkeypatch.setattr(hooks, "FOLD_PASSES", 2)
    device = torch.device("cuda")
    torch.manual_seed(0)
    policy = TinyPolicy().to(device)
    host = _SeededHost().to(device)
    tele = Telemetry(policy, heads={"op": policy.op})
    for i, seed in enumerate(host.seeds):
        tele.watch_seed(seed, host=host, env="0", slot=f"r0c{i}")
    x = torch.randn(64, 16, device=device)
    try:
        for accumulate in (False, True):
            torch.cuda.synchronize()
            with tele.update(), _no_sync():
                for _ in range(3):
                    host.zero_grad(set_to_none=True)
                    host(x).pow(2).mean().backward()
                    if accumulate:
                        host(x).pow(2).mean().backward()
            snap = tele.snapshot()
            for i, seed in enumerate(host.seeds):
                state = snap.seed("0", f"r0c{i}")
                assert state.passes == (6 if accumulate else 3)  # equal passes, no optimizer step
                expected = _rms_ratio64(host, seed)  # .grad now holds two equal passes: the same ratio
                assert state.ratio == pytest.approx(expected, rel=1e-5)
        assert tele.errors() == {}
    finally:
        tele.close()


def test_a_demo_updates_optimisation_makes_no_host_sync_and_its_publish_one_transfer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`tele-exporter demo --device cuda`: the PPO epochs of an update (clip, KL, entropy, ratios, seeds) never
    sync; the publish copies to the host once. The rollout (the demo's own environments) is left out."""
    import tele_exporter.telemetry.packer as packer_module
    from tele_exporter.demo.ppo import DemoConfig, Trainer

    transfers: list[int] = []
    real = packer_module.gather

    def gather(parts: list[torch.Tensor]) -> torch.Tensor:
        transfers.append(len(parts))
        torch.cuda.set_sync_debug_mode("default")  # the update's one transfer is allowed to wait
        try:
            return real(parts)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(packer_module, "gather", gather)
    trainer = Trainer(DemoConfig(updates=2, envs=2, seed=0, device="cuda"))
    try:
        trainer.update()  # the first update builds the meter's plans
        upd = trainer.tele.update().__enter__()
        rollout = trainer.rollout(False)
        torch.cuda.synchronize()
        transfers.clear()
        with _no_sync():
            trainer._optimise(upd, rollout, False)
            upd.__exit__(None, None, None)  # the publish
        assert len(transfers) == 1
        assert trainer.tele.errors() == {}
    finally:
        trainer.close()


def test_a_steady_clip_on_cuda_launches_what_torchs_does() -> None:
    """The counted contract of tests/measure/test_meter.py, on the device where launches cost."""
    from tele_exporter.measure.dispatch_counter import DispatchCounter

    device = torch.device("cuda")
    torch.manual_seed(0)
    policy = TinyPolicy().to(device)
    tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, groups={"value": policy.value})
    x = torch.randn(256, 6, device=device)
    try:
        with tele.update() as upd:
            for _ in range(3):
                _loss(policy, x).backward()
                with DispatchCounter() as ours:
                    upd.clip_grad_norm_(0.5)
            _loss(policy, x).backward()
            with DispatchCounter() as theirs:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
        assert ours.launches <= theirs.launches and ours.reads == 0
    finally:
        tele.close()


def test_layers_and_update_ratios_make_no_host_sync_and_keep_the_clip_at_torchs_launches() -> None:
    """Layers and update ratios on: opening the update (the copy) and each step sync nothing; ratios float64-true."""
    from tele_exporter.measure.dispatch_counter import DispatchCounter

    device = torch.device("cuda")
    torch.manual_seed(0)
    policy = TinyPolicy().to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, groups={"value": policy.value}, layers=True)
    x = torch.randn(256, 6, device=device)
    before = [p.detach().double().cpu() for p in policy.parameters()]
    try:
        torch.cuda.synchronize()
        with _no_sync():
            upd = tele.update().__enter__()
            for _ in range(5):
                _loss(policy, x).backward()
                with DispatchCounter() as ours:
                    upd.clip_grad_norm_(0.5)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            assert ours.launches == 8 and ours.reads == 0
        upd.__exit__(None, None, None)
        after = [p.detach().double().cpu() for p in policy.parameters()]
        delta = torch.cat([(a - b).flatten() for a, b in zip(after, before, strict=True)]).norm()
        expected = float(delta / torch.cat([b.flatten() for b in before]).norm())
        snap = tele.snapshot()
        assert {layer.name for layer in snap.layers} == {"trunk", "op", "slot", "value"} and snap.dead_layers == 0
        whole = math.sqrt(
            sum((layer.update_ratio or 0.0) ** 2 * _sq(policy, layer.name, before) for layer in snap.layers)
        )
        assert whole / math.sqrt(sum(float(b.pow(2).sum()) for b in before)) == pytest.approx(expected, rel=1e-5)
    finally:
        tele.close()


def _sq(policy: TinyPolicy, layer: str, before: list[torch.Tensor]) -> float:
    """Squared norm of one layer's weights before the update, from the test's own copy."""
    names = [n for n, _ in policy.named_parameters()]
    return sum(float(b.pow(2).sum()) for n, b in zip(names, before, strict=True) if n.split(".")[0] == layer)
