"""hooks: TELE-557 probes, the seed/host gradient RMS ratio and the backward gain; handles remove themselves."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tele_exporter import Telemetry

from ..conftest import TinyPolicy


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


def _reference_gain(host: Host, x: torch.Tensor) -> float:
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


def test_backward_gain_matches_autograd_reference(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, host = setup
    x = torch.randn(16, 4)
    expected = _reference_gain(host, x)
    tele.watch_seed(host.seed, host=host, env=0, slot="r0c0", backward_gain=True)
    _train(tele, host, x)
    seed = tele.snapshot().seed("0", "r0c0")
    assert seed.backward_gain == pytest.approx(expected, rel=1e-6)
    assert seed.passes == 1


class Parallel(nn.Module):
    """A host layer `a` with seeds as parallel branches: y = a(x) + sum(alpha_i * seed_i(x)), a linear loss.

    The seeds are submodules of the host, so the host's own parameters must exclude them.
    """

    def __init__(self, seeds: dict[str, nn.Module], alphas: dict[str, float] | None = None) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.seeds = nn.ModuleDict(seeds)
        self.alphas = alphas or dict.fromkeys(seeds, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        for name, seed in self.seeds.items():
            y = y + self.alphas[name] * seed(x)
        return y


def _relu_seed(scale: float = 1.0) -> nn.Module:
    seed = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 5))
    with torch.no_grad():
        for p in seed.parameters():
            p.mul_(scale)
    return seed


def _reference_rms_ratio(host: nn.Module, seed: nn.Module, grads: dict[int, np.ndarray]) -> float:
    """TELE-557 in float64 numpy: (|g_seed|/sqrt(n_seed)) / (|g_host|/sqrt(n_host) + 1e-8); 0 below 1e-8."""
    seed_ids = {id(p) for p in seed.parameters()}
    seeds_of_host = {id(p) for m in getattr(host, "seeds", {}).values() for p in m.parameters()}
    host_params = [p for p in host.parameters() if id(p) not in seeds_of_host]
    g_s = np.sqrt(sum(np.sum(grads[id(p)] ** 2) for p in seed.parameters() if id(p) in seed_ids))
    g_h = np.sqrt(sum(np.sum(grads[id(p)] ** 2) for p in host_params))
    n_s = sum(p.numel() for p in seed.parameters())
    n_h = sum(p.numel() for p in host_params)
    if g_s < 1e-8 or g_h < 1e-8:
        return 0.0
    return float((g_s / np.sqrt(n_s)) / (g_h / np.sqrt(n_h) + 1e-8))


def _backward_pass(host: Parallel, seed_x: int) -> dict[int, np.ndarray]:
    """One backward pass of a linear loss; returns that pass's gradients in float64, by parameter id."""
    gen = torch.Generator().manual_seed(seed_x)
    x = torch.randn(16, 6, generator=gen)
    c = torch.randn(16, 5, generator=gen)
    host.zero_grad(set_to_none=True)
    (host(x) * c).sum().backward()
    return {id(p): p.grad.numpy().astype(np.float64) for p in host.parameters() if p.grad is not None}


def test_a_seed_that_learns_as_fast_as_its_host_has_ratio_one(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, _ = setup
    torch.manual_seed(1)
    twin = nn.Linear(6, 5)
    host = Parallel({"s": twin})
    with torch.no_grad():
        twin.weight.copy_(host.a.weight)
        twin.bias.copy_(host.a.bias)
    tele.watch_seed(twin, host=host, env=0, slot="s")
    with tele.update():
        grads = _backward_pass(host, 0)
    state = tele.snapshot().seed("0", "s")
    assert state.ratio == pytest.approx(_reference_rms_ratio(host, twin, grads), rel=1e-6)
    assert state.ratio == pytest.approx(1.0, rel=1e-6) and state.shown.label == "ratio=1.00"
    assert not state.vanishing and not state.exploding and state.passes == 1


@pytest.mark.parametrize(("alpha", "level"), [(1e-3, "vanishing"), (1e-12, "no_data"), (0.0, "no_data")])
def test_alpha_toward_zero_vanishes_then_has_no_data(
    setup: tuple[TinyPolicy, Telemetry, Host], alpha: float, level: str
) -> None:
    _, tele, _ = setup
    torch.manual_seed(2)
    seed = _relu_seed()
    host = Parallel({"s": seed}, {"s": alpha})
    tele.watch_seed(seed, host=host, env=0, slot="s")
    with tele.update():
        grads = _backward_pass(host, 0)
    state = tele.snapshot().seed("0", "s")
    assert state.ratio == pytest.approx(_reference_rms_ratio(host, seed, grads), rel=1e-6, abs=0)
    assert tele.catalog["seed_grad_ratio"].level_of(state.ratio).name == level  # type: ignore[union-attr]
    assert state.vanishing == (level == "vanishing") and not state.exploding


def test_weights_scaled_by_100_explode(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, _ = setup
    torch.manual_seed(3)
    calm, wild = _relu_seed(), _relu_seed()
    with torch.no_grad():
        for p, q in zip(calm.parameters(), wild.parameters(), strict=True):
            q.copy_(p * 100.0)
    host = Parallel({"calm": calm, "wild": wild})
    tele.watch_seed(calm, host=host, env=0, slot="calm")
    tele.watch_seed(wild, host=host, env=0, slot="wild")
    with tele.update():
        grads = _backward_pass(host, 0)
    snap = tele.snapshot()
    assert snap.seed("0", "calm").ratio == pytest.approx(_reference_rms_ratio(host, calm, grads), rel=1e-6)
    assert snap.seed("0", "wild").ratio == pytest.approx(_reference_rms_ratio(host, wild, grads), rel=1e-6)
    assert snap.seed("0", "wild").ratio > 50 * snap.seed("0", "calm").ratio
    assert snap.seed("0", "wild").exploding and snap.seed("0", "wild").shown.label == "▲ EXPLODING"
    assert not snap.seed("0", "calm").exploding


def test_several_seeds_on_one_host_over_several_passes(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    """One hook per host; the host's parameters exclude every seed's; the update's value is the mean over passes."""
    _, tele, _ = setup
    torch.manual_seed(4)
    seeds = {f"s{i}": _relu_seed(0.5 + i) for i in range(4)}
    host = Parallel(seeds, {f"s{i}": 0.3 * (i + 1) for i in range(4)})
    for name, seed in seeds.items():
        tele.watch_seed(seed, host=host, env="7", slot=name)
    assert len(tele._seeds.hosts) == 1
    expected: dict[str, list[float]] = {name: [] for name in seeds}
    with tele.update():
        for k in range(3):
            grads = _backward_pass(host, k)
            for name, seed in seeds.items():
                expected[name].append(_reference_rms_ratio(host, seed, grads))
    for name in seeds:
        state = tele.snapshot().seed("7", name)
        assert state.passes == 3
        assert state.ratio == pytest.approx(float(np.mean(expected[name])), rel=1e-6)


def _reference_among(host: nn.Module, seed: nn.Module, watched: list[nn.Module], grads: dict[int, np.ndarray]) -> float:
    """TELE-557 in float64 numpy, with only the `watched` seeds' parameters taken out of the host's."""
    out = {id(p) for m in watched for p in m.parameters()}
    g_s = np.sqrt(sum(np.sum(grads[id(p)] ** 2) for p in seed.parameters()))
    host_params = [p for p in host.parameters() if id(p) not in out]
    g_h = np.sqrt(sum(np.sum(grads[id(p)] ** 2) for p in host_params))
    n_s, n_h = sum(p.numel() for p in seed.parameters()), sum(p.numel() for p in host_params)
    return float((g_s / np.sqrt(n_s)) / (g_h / np.sqrt(n_h) + 1e-8))


def test_passes_are_summed_in_batches_while_seeds_join_and_leave_and_each_stays_exact(
    setup: tuple[TinyPolicy, Telemetry, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folds of 3 passes whose layouts differ (a seed joins at pass 2, one leaves at 5), then the drain's rest."""
    import tele_exporter.measure.seed_probes as hooks

    monkeypatch.setattr(hooks, "FOLD_PASSES", 3)
    _, tele, _ = setup
    torch.manual_seed(17)
    seeds = {name: _relu_seed(scale) for name, scale in (("a", 1.0), ("b", 2.0), ("c", 0.5))}
    host = Parallel(seeds)
    watches = {name: tele.watch_seed(seeds[name], host=host, env=0, slot=name) for name in ("a", "b")}
    expected: dict[str, list[float]] = {"a": [], "c": []}
    with tele.update():
        for k in range(8):
            if k == 2:
                watches["c"] = tele.watch_seed(seeds["c"], host=host, env=0, slot="c")
            if k == 5:
                watches.pop("b").remove()
            grads = _backward_pass(host, k)
            watched = [seeds[name] for name in watches]
            for name in expected:
                if name in watches:
                    expected[name].append(_reference_among(host, seeds[name], watched, grads))
    snap = tele.snapshot()
    assert [s.slot for s in snap.seeds] == ["a", "c"] and tele.errors() == {}
    for name, values in expected.items():
        assert snap.seed("0", name).passes == len(values) == {"a": 8, "c": 6}[name]
        assert snap.seed("0", name).ratio == pytest.approx(float(np.mean(values)), rel=1e-6)


def test_passes_piling_up_between_publishes_keep_a_bounded_number_of_the_newest(
    setup: tuple[TinyPolicy, Telemetry, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 passes in one update, folds of 2, room for 6: past 3 blocks the oldest half goes, leaving the newest 4."""
    import tele_exporter.measure.seed_probes as hooks

    monkeypatch.setattr(hooks, "FOLD_PASSES", 2)
    monkeypatch.setattr(hooks, "MAX_PENDING_PASSES", 6)
    _, tele, _ = setup
    torch.manual_seed(18)
    seed = _relu_seed()
    host = Parallel({"s": seed})
    tele.watch_seed(seed, host=host, env=0, slot="s")
    ratios = []
    with tele.update():
        for k in range(20):
            ratios.append(_reference_rms_ratio(host, seed, _backward_pass(host, k)))
    state = tele.snapshot().seed("0", "s")
    assert state.passes == 4
    assert state.ratio == pytest.approx(float(np.mean(ratios[-4:])), rel=1e-6)
    assert len({round(r, 9) for r in ratios[-4:]} | {round(r, 9) for r in ratios[:4]}) == 8  # the passes differ


def test_a_fold_that_fails_is_counted_and_loses_only_its_own_passes(
    setup: tuple[TinyPolicy, Telemetry, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tele_exporter.measure.seed_probes as hooks

    fold = hooks._fold
    calls: list[int] = []

    def first_fails(measured: list[object]) -> object:
        calls.append(len(measured))
        if len(calls) == 1:
            raise RuntimeError("injected")
        return fold(measured)  # type: ignore[arg-type]

    monkeypatch.setattr(hooks, "FOLD_PASSES", 2)
    monkeypatch.setattr(hooks, "_fold", first_fails)
    _, tele, _ = setup
    torch.manual_seed(20)
    seed = _relu_seed()
    host = Parallel({"s": seed})
    tele.watch_seed(seed, host=host, env=0, slot="s")
    with tele.update():
        ratios = [_reference_rms_ratio(host, seed, _backward_pass(host, k)) for k in range(5)]
    assert calls == [2, 2, 1]  # in the callbacks of passes 1 and 3, then the drain's rest
    assert tele.errors() == {"seed_grad_hook": 1}
    state = tele.snapshot().seed("0", "s")
    assert state.passes == 3 and state.ratio == pytest.approx(float(np.mean(ratios[2:])), rel=1e-6)


def test_removing_a_seed_during_training_leaves_the_others_and_no_hooks(
    setup: tuple[TinyPolicy, Telemetry, Host],
) -> None:
    _, tele, _ = setup
    torch.manual_seed(5)
    seeds = {"keep": _relu_seed(), "drop": _relu_seed()}
    host = Parallel(seeds)
    watches = {name: tele.watch_seed(seed, host=host, env=0, slot=name) for name, seed in seeds.items()}
    with tele.update():
        _backward_pass(host, 0)
        watches["drop"].remove()
        watches["drop"].remove()
        grads = _backward_pass(host, 1)
    snap = tele.snapshot()
    assert [s.slot for s in snap.seeds] == ["keep"]
    # after the removal the dropped seed's parameters count as the host's own again
    del host.seeds["drop"]
    later = _reference_rms_ratio(host, seeds["keep"], grads)
    assert snap.seed("0", "keep").passes == 2 and later > 0
    watches["keep"].remove()
    assert not tele._seeds.hosts
    assert all(not p._backward_hooks for p in (*host.parameters(), *seeds["drop"].parameters()))  # type: ignore[attr-defined]
    with tele.update():
        _backward_pass(host, 2)
    assert tele.snapshot().seeds == ()


def test_autograd_grad_over_the_parameters_is_one_pass_and_never_breaks(
    setup: tuple[TinyPolicy, Telemetry, Host],
) -> None:
    """torch.autograd.grad runs the hooks too (register_multi_grad_hook would raise there)."""
    _, tele, _ = setup
    torch.manual_seed(6)
    seed = _relu_seed()
    host = Parallel({"s": seed})
    tele.watch_seed(seed, host=host, env=0, slot="s")
    x = torch.randn(16, 6)
    with tele.update():
        params = list(host.parameters())
        grads = torch.autograd.grad(host(x).sum(), params)
    assert all(p.grad is None for p in params)
    by_id = {id(p): g.numpy().astype(np.float64) for p, g in zip(params, grads, strict=True)}
    state = tele.snapshot().seed("0", "s")
    assert state.passes == 1 and state.ratio == pytest.approx(_reference_rms_ratio(host, seed, by_id), rel=1e-6)
    assert tele.errors() == {}


def test_host_and_seed_must_be_modules_and_distinct(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, host = setup
    with pytest.raises(TypeError, match="host as an nn.Module"):
        tele.watch_seed(host.seed, host="net", env=0, slot="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="its own host"):
        tele.watch_seed(host.seed, host=host.seed, env=0, slot="a")
    assert not tele._seeds.hosts and tele.snapshot().seeds == ()


def test_in_place_op_inside_the_seed(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, _ = setup
    host = Host(InPlaceSeed())
    x = torch.randn(16, 4)
    expected = _reference_gain(host, x)
    tele.watch_seed(host.seed, host=host, env=0, slot="s", backward_gain=True)
    _train(tele, host, x)
    assert tele.snapshot().seed("0", "s").backward_gain == pytest.approx(expected, rel=1e-6)


def test_seed_whose_input_does_not_require_grad_reports_no_data(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, _ = setup
    seed = nn.Linear(4, 1)
    tele.watch_seed(seed, host=nn.Linear(1, 1), env=0, slot="first", backward_gain=True)
    with tele.update():
        seed(torch.randn(3, 4)).sum().backward()  # raw data: no gradient reaches the input
    state = tele.snapshot().seed("0", "first")
    assert state.backward_gain is None and state.ratio == 0.0 and state.shown.label == "no data"
    assert not state.vanishing  # 0.0 is "no data", never vanishing


def test_a_seed_that_passes_no_gradient_back_has_a_measured_gain_of_zero_not_a_missing_one(
    setup: tuple[TinyPolicy, Telemetry, Host],
) -> None:
    """Zero weights: dL/d input = W^T dL/d output = 0 while dL/d output is not; that 0.0 is data."""
    _, tele, _ = setup
    seed = nn.Linear(8, 8)
    with torch.no_grad():
        seed.weight.zero_()
    host = Host(seed)
    tele.watch_seed(seed, host=host, env=0, slot="blocked", backward_gain=True)
    _train(tele, host, torch.randn(16, 4))
    assert tele.snapshot().seed("0", "blocked").backward_gain == 0.0


def test_seed_without_backward_reports_no_data(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, host = setup
    tele.watch_seed(host.seed, host=host, env=0, slot="r")
    with tele.update(), torch.no_grad():
        host(torch.randn(2, 4))
    assert tele.snapshot().seed("0", "r").ratio == 0.0


def test_remove_is_idempotent_leaves_no_hooks_and_drops_the_series(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, host = setup
    watch = tele.watch_seed(host.seed, host=host, env=0, slot="r0c1", backward_gain=True)
    assert host.seed._forward_hooks and host.seed._forward_pre_hooks
    assert [(s.env, s.slot) for s in tele.snapshot().seeds] == [("0", "r0c1")]
    watch.remove()
    watch.remove()
    assert not host.seed._forward_hooks and not host.seed._forward_pre_hooks
    assert tele.snapshot().seeds == ()
    assert not watch.active
    with tele.watch_seed(host.seed, host=host, env=0, slot="r0c1", backward_gain=True) as again:
        assert again.active
    assert not host.seed._forward_hooks and tele.snapshot().seeds == ()


def test_watching_the_same_slot_twice_is_a_user_error(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, host = setup
    tele.watch_seed(host.seed, host=host, env=0, slot="x")
    with pytest.raises(ValueError, match="env='0' slot='x'"):
        tele.watch_seed(nn.Linear(2, 2), host=host, env=0, slot="x")
    with pytest.raises(TypeError, match="nn.Module"):
        tele.watch_seed("seed", host=host, env=0, slot="y")  # type: ignore[arg-type]


def test_seed_cap_refuses_and_counts(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    policy, _, host = setup
    tele = Telemetry(policy, heads={"op": policy.op}, max_seeds=1)
    tele.watch_seed(host.seed, host=host, env=0, slot="a")
    refused = tele.watch_seed(nn.Linear(2, 2), host=host, env=0, slot="b")
    assert not refused.active
    refused.remove()
    assert tele.snapshot().seeds_refused == 1
    assert [s.slot for s in tele.snapshot().seeds] == ["a"]


def test_max_seeds_takes_numpy_integers_and_refuses_bools_and_fractions() -> None:
    policy = TinyPolicy()
    tele = Telemetry(policy, heads={"op": policy.op}, max_seeds=np.int64(2))
    assert tele.max_seeds == 2 and type(tele.max_seeds) is int
    tele.close()
    for bad in (True, 2.5, np.float64(2.0), -1):
        with pytest.raises(ValueError, match="max_seeds must be a whole number >= 0"):
            Telemetry(policy, heads={"op": policy.op}, max_seeds=bad)  # type: ignore[arg-type]


def test_an_exception_inside_a_seed_hook_is_counted_and_backward_goes_on(
    setup: tuple[TinyPolicy, Telemetry, Host], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, tele, host = setup
    import tele_exporter.measure.seed_probes as hooks

    def boom(grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected")

    monkeypatch.setattr(hooks, "_gain_norm", boom)
    caplog.set_level(logging.WARNING, logger="tele_exporter")
    tele.watch_seed(host.seed, host=host, env=0, slot="r", backward_gain=True)
    for _ in range(2):
        _train(tele, host, torch.randn(4, 4))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in host.parameters())
    assert tele.errors()["seed_hook"] == 4  # two hooks a pass, two passes
    assert caplog.text.count("telemetry failed in seed_hook") == 1
    assert tele.snapshot().seed("0", "r").backward_gain is None  # missing, never 0


def test_nonfinite_seed_gradients_are_data(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    _, tele, host = setup
    with torch.no_grad():
        host.seed.weight[0, 0] = float("inf")  # type: ignore[index]
    tele.watch_seed(host.seed, host=host, env=0, slot="r", backward_gain=True)
    _train(tele, host, torch.randn(4, 4))
    state = tele.snapshot().seed("0", "r")
    assert state.backward_gain is not None and not math.isfinite(state.backward_gain)
    assert not math.isfinite(state.ratio)
    assert state.exploding and state.shown.label == "▲ EXPLODING"  # a non-finite ratio is exploding


def test_a_seed_that_modifies_its_input_in_place_is_measured_from_its_second_pass(
    setup: tuple[TinyPolicy, Telemetry, Host],
) -> None:
    """A hook on a view is dropped when the view is modified in place; the probe then copies."""

    class Tripler(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return z.mul_(3.0)

    _, tele, _ = setup
    lin, seed, out = nn.Linear(4, 4), Tripler(), nn.Linear(4, 1)
    tele.watch_seed(seed, host=out, env=0, slot="t", backward_gain=True)
    with tele.update():
        out(seed(lin(torch.randn(5, 4)))).sum().backward()
    assert tele.snapshot().seed("0", "t").backward_gain is None  # first pass: no data, and now detected
    with tele.update():
        out(seed(lin(torch.randn(5, 4)))).sum().backward()
    assert tele.snapshot().seed("0", "t").backward_gain == pytest.approx(3.0)


@pytest.mark.parametrize(("path", "target"), [("deferred", "tensor_norm_list"), ("in_hook", "tensor_norm")])
def test_a_failing_seed_norm_is_counted_and_leaves_no_data_and_backward_goes_on(
    setup: tuple[TinyPolicy, Telemetry, Host], monkeypatch: pytest.MonkeyPatch, path: str, target: str
) -> None:
    """The fallback of the TELE-557 probe: no pass is recorded (never a 0.0 or a partial sum that passes for data).

    Fresh gradients are normed together at the end of the pass (one error a pass);
    gradients that accumulate into an existing .grad are normed in their hooks (one error each).
    """
    import tele_exporter.measure.seed_probes as hooks

    def boom(tensors: object) -> torch.Tensor:
        raise RuntimeError("injected")

    _, tele, _ = setup
    seed = _relu_seed()
    host = Parallel({"s": seed})
    tele.watch_seed(seed, host=host, env=0, slot="s", backward_gain=False)
    monkeypatch.setattr(hooks, target, boom)
    if path == "in_hook":
        for p in host.parameters():
            p.grad = torch.zeros_like(p)
    with tele.update():
        for k in range(2):
            if path == "deferred":
                _backward_pass(host, k)
            else:
                _accumulating_pass(host, k)
    assert all(p.grad is not None for p in host.parameters())
    per_pass = 1 if path == "deferred" else len(list(host.parameters()))
    assert tele.errors() == {"seed_grad_hook": 2 * per_pass}
    state = tele.snapshot().seed("0", "s")
    assert state.ratio == 0.0 and state.passes == 0 and not state.vanishing


def _accumulating_pass(host: Parallel, seed_x: int, *, uses: tuple[str, ...] | None = None) -> dict[int, np.ndarray]:
    """A backward pass into .grad as left by earlier passes (gradient accumulation); returns this pass's gradients.

    `uses`: the seeds this pass's forward runs (default all); the others get no gradient in it.
    """
    gen = torch.Generator().manual_seed(seed_x)
    x = torch.randn(16, 6, generator=gen)
    c = torch.randn(16, 5, generator=gen)
    before = {id(p): p.grad.numpy().astype(np.float64) for p in host.parameters() if p.grad is not None}
    y = host.a(x)
    for name, seed in host.seeds.items():
        if uses is None or name in uses:
            y = y + host.alphas[name] * seed(x)
    (y * c).sum().backward()
    grads = {}
    for p in host.parameters():
        if p.grad is not None:
            now = p.grad.numpy().astype(np.float64)
            if id(p) in before or not np.array_equal(now, np.zeros_like(now)):
                grads[id(p)] = now - before.get(id(p), 0.0)
    return grads


def _zeros_for_missing(host: nn.Module, grads: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    return {id(p): grads.get(id(p), np.zeros(tuple(p.shape))) for p in host.parameters()}


def test_two_backward_passes_per_step_each_measure_their_own_gradient(
    setup: tuple[TinyPolicy, Telemetry, Host],
) -> None:
    """Gradient accumulation: the second pass adds into .grad, and its ratio is of its own gradient, not the sum."""
    _, tele, _ = setup
    torch.manual_seed(8)
    seeds = {"a": _relu_seed(), "b": _relu_seed(3.0)}
    host = Parallel(seeds, {"a": 1.0, "b": 0.2})
    for name, seed in seeds.items():
        tele.watch_seed(seed, host=host, env=0, slot=name, backward_gain=False)
    expected: dict[str, list[float]] = {name: [] for name in seeds}
    with tele.update():
        for step in range(2):
            host.zero_grad(set_to_none=True)
            for micro in range(2):
                grads = _accumulating_pass(host, 10 * step + micro)
                for name, seed in seeds.items():
                    expected[name].append(_reference_rms_ratio(host, seed, grads))
    assert len({round(v, 6) for v in expected["a"]}) == 4  # four different passes
    for name in seeds:
        state = tele.snapshot().seed("0", name)
        assert state.passes == 4
        assert state.ratio == pytest.approx(float(np.mean(expected[name])), rel=1e-6)
    assert tele.errors() == {}


def test_a_seed_without_gradient_in_a_pass_has_no_data_there(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    """Seed b skips the first pass; in the second its .grad is fresh while the host's accumulates (both paths)."""
    _, tele, _ = setup
    torch.manual_seed(9)
    seeds = {"a": _relu_seed(), "b": _relu_seed(2.0)}
    host = Parallel(seeds)
    for name, seed in seeds.items():
        tele.watch_seed(seed, host=host, env=0, slot=name, backward_gain=False)
    with tele.update():
        host.zero_grad(set_to_none=True)
        first = _accumulating_pass(host, 0, uses=("a",))
        second = _accumulating_pass(host, 1)
    assert id(next(seeds["b"].parameters())) not in first
    snap = tele.snapshot()
    expected_a = np.mean([_reference_rms_ratio(host, seeds["a"], g) for g in (first, second)])
    expected_b = _reference_rms_ratio(host, seeds["b"], second)
    assert _reference_rms_ratio(host, seeds["b"], _zeros_for_missing(host, first)) == 0.0
    assert snap.seed("0", "a").passes == 2 and snap.seed("0", "a").ratio == pytest.approx(expected_a, rel=1e-6)
    assert snap.seed("0", "b").passes == 1 and snap.seed("0", "b").ratio == pytest.approx(expected_b, rel=1e-6)


@pytest.mark.parametrize("path", ["deferred", "in_hook"])
def test_nonfinite_parameter_gradients_make_the_ratio_exploding_on_both_paths(
    setup: tuple[TinyPolicy, Telemetry, Host], path: str
) -> None:
    _, tele, _ = setup
    torch.manual_seed(10)
    seed = _relu_seed()
    host = Parallel({"s": seed})
    tele.watch_seed(seed, host=host, env=0, slot="s", backward_gain=False)
    with torch.no_grad():
        seed[0].weight[0, 0] = float("nan")  # type: ignore[index]
    host.zero_grad(set_to_none=path == "deferred")
    with tele.update():
        _accumulating_pass(host, 0)
    state = tele.snapshot().seed("0", "s")
    assert math.isnan(state.ratio) and state.passes == 1
    assert state.exploding and state.shown.label == "▲ EXPLODING"


def test_a_nonfinite_seed_leaves_the_other_seeds_of_its_host_exact(setup: tuple[TinyPolicy, Telemetry, Host]) -> None:
    """Per host and seed sums stay apart: a NaN or Inf in one seed's gradient is that seed's alone."""
    _, tele, _ = setup
    torch.manual_seed(19)
    seeds = {"nan": _relu_seed(), "inf": _relu_seed(), "good": _relu_seed()}
    host = Parallel(seeds)
    for name, seed in seeds.items():
        tele.watch_seed(seed, host=host, env=0, slot=name, backward_gain=False)
    poison = {"nan": float("nan"), "inf": float("inf")}
    for name, value in poison.items():  # the forward stays finite: only these gradients are not
        seeds[name][0].weight.register_hook(lambda g, v=value: g.index_fill(0, torch.tensor([0]), v))  # type: ignore[index]
    with tele.update():
        grads = _backward_pass(host, 0)
    snap = tele.snapshot()
    for name in poison:
        assert not math.isfinite(snap.seed("0", name).ratio) and snap.seed("0", name).exploding
    reference = _reference_rms_ratio(host, seeds["good"], grads)
    assert math.isfinite(reference) and snap.seed("0", "good").ratio == pytest.approx(reference, rel=1e-6)


def test_a_hook_that_takes_grad_away_drops_that_pass_and_later_passes_are_normed_in_hooks(
    setup: tuple[TinyPolicy, Telemetry, Host],
) -> None:
    """An optimizer-in-backward hook steps and sets .grad to None: the pass is missing, the next ones measured."""
    _, tele, _ = setup
    torch.manual_seed(11)
    seed = _relu_seed()
    host = Parallel({"s": seed})
    tele.watch_seed(seed, host=host, env=0, slot="s", backward_gain=False)
    seen: list[dict[int, np.ndarray]] = [{}]

    def take(p: torch.Tensor) -> None:
        assert p.grad is not None
        seen[-1][id(p)] = p.grad.numpy().astype(np.float64)
        p.grad = None

    for p in host.parameters():
        p.register_post_accumulate_grad_hook(take)
    with tele.update():
        _backward_pass(host, 0)
    assert tele.snapshot().seed("0", "s").passes == 0 and tele.errors() == {}
    with tele.update():
        seen.append({})
        _backward_pass(host, 1)
    state = tele.snapshot().seed("0", "s")
    assert state.passes == 1
    assert state.ratio == pytest.approx(_reference_rms_ratio(host, seed, seen[-1]), rel=1e-6)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_backward_is_measured_and_builds_no_graph_through_the_norms(
    setup: tuple[TinyPolicy, Telemetry, Host],
) -> None:
    _, tele, _ = setup
    torch.manual_seed(12)
    seed = _relu_seed()
    host = Parallel({"s": seed})
    tele.watch_seed(seed, host=host, env=0, slot="s", backward_gain=False)
    x, c = torch.randn(16, 6), torch.randn(16, 5)
    with tele.update():
        (torch.tanh(host(x)) * c).sum().backward(create_graph=True)
    grads = {id(p): p.grad.detach().numpy().astype(np.float64) for p in host.parameters() if p.grad is not None}
    state = tele.snapshot().seed("0", "s")
    assert state.passes == 1 and state.ratio == pytest.approx(_reference_rms_ratio(host, seed, grads), rel=1e-6)
    assert all(p.grad is not None and p.grad.requires_grad for p in host.parameters())
    assert tele.errors() == {}
    for p in host.parameters():
        p.grad = None


def _forbid_norms_in_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gradient normed in its hook now raises (and is counted): the test shows every one was read from .grad."""
    import tele_exporter.measure.seed_probes as hooks

    def boom(tensor: object) -> torch.Tensor:
        raise RuntimeError("normed in a hook")

    monkeypatch.setattr(hooks, "tensor_norm", boom)


def test_fresh_gradients_are_still_read_at_the_end_of_the_pass_after_the_host_changes_dtype(
    setup: tuple[TinyPolicy, Telemetry, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`.double()` gives every parameter a new AccumulateGrad node; the cached one is looked up again, not dropped."""
    _, tele, _ = setup
    torch.manual_seed(13)
    seed = _relu_seed()
    host = Parallel({"s": seed})
    tele.watch_seed(seed, host=host, env=0, slot="s", backward_gain=False)
    _forbid_norms_in_hooks(monkeypatch)
    with tele.update():
        _backward_pass(host, 0)
    host.double()
    gen = torch.Generator().manual_seed(1)
    x, c = (
        torch.randn(16, 6, generator=gen, dtype=torch.float64),
        torch.randn(16, 5, generator=gen, dtype=torch.float64),
    )
    with tele.update():
        host.zero_grad(set_to_none=True)
        (host(x) * c).sum().backward()
    grads = {id(p): p.grad.numpy() for p in host.parameters() if p.grad is not None}
    assert tele.errors() == {}
    state = tele.snapshot().seed("0", "s")
    assert state.passes == 1 and state.ratio == pytest.approx(_reference_rms_ratio(host, seed, grads), rel=1e-12)


class MixedPrecisionHost(nn.Module):
    """A float32 host layer with a float64 seed: the end-of-pass read norms each dtype in its own fused call."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.seeds = nn.ModuleDict({"s": _relu_seed().double()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.seeds["s"](x.double()).float()


def test_a_host_whose_seed_has_another_dtype_is_read_at_the_end_of_the_pass_and_exact(
    setup: tuple[TinyPolicy, Telemetry, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tele, _ = setup
    torch.manual_seed(16)
    host = MixedPrecisionHost()
    seed = host.seeds["s"]
    tele.watch_seed(seed, host=host, env=0, slot="s")
    _forbid_norms_in_hooks(monkeypatch)
    with tele.update():
        grads = _backward_pass(host, 0)  # type: ignore[arg-type]
    assert tele.errors() == {}
    state = tele.snapshot().seed("0", "s")
    assert state.passes == 1 and state.ratio == pytest.approx(_reference_rms_ratio(host, seed, grads), rel=1e-6)


def test_under_ddp_every_gradient_is_normed_in_its_hook(
    setup: tuple[TinyPolicy, Telemetry, Host], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """DDP may rewrite .grad in its buckets during the pass, so nothing is read from .grad at its end."""
    from torch.nn.parallel import DistributedDataParallel

    import tele_exporter.measure.seed_probes as hooks

    def boom(tensors: object) -> torch.Tensor:
        raise RuntimeError("read from .grad")

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        _, tele, _ = setup
        torch.manual_seed(14)
        seed = _relu_seed()
        host = Parallel({"s": seed})
        wrapped = DistributedDataParallel(host)
        tele.watch_seed(seed, host=host, env=0, slot="s", backward_gain=False)
        monkeypatch.setattr(hooks, "tensor_norm_list", boom)
        x, c = torch.randn(16, 6), torch.randn(16, 5)
        with tele.update():
            host.zero_grad(set_to_none=True)
            (wrapped(x) * c).sum().backward()
        grads = {id(p): p.grad.numpy().astype(np.float64) for p in host.parameters() if p.grad is not None}
        assert tele.errors() == {}
        state = tele.snapshot().seed("0", "s")
        assert state.passes == 1 and state.ratio == pytest.approx(_reference_rms_ratio(host, seed, grads), rel=1e-6)
    finally:
        torch.distributed.destroy_process_group()


def test_when_the_accumulator_lookup_fails_the_hooks_norm_every_gradient(
    setup: tuple[TinyPolicy, Telemetry, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tele_exporter.measure.seed_probes as hooks

    def boom(param: object) -> object:
        raise TypeError("injected")

    _, tele, _ = setup
    torch.manual_seed(15)
    seed = _relu_seed()
    host = Parallel({"s": seed})
    tele.watch_seed(seed, host=host, env=0, slot="s", backward_gain=False)
    monkeypatch.setattr(hooks, "_grad_accumulator", boom)
    with tele.update():
        grads = _backward_pass(host, 0)
    assert tele.errors() == {"seed_grad_hook": 1}
    state = tele.snapshot().seed("0", "s")
    assert state.passes == 1 and state.ratio == pytest.approx(_reference_rms_ratio(host, seed, grads), rel=1e-6)


def test_the_fold_sums_each_device_on_its_own_and_keeps_a_nan_in_its_group() -> None:
    """A host split over devices: no norm is copied to another device before the publish (meta stands in for a GPU)."""
    from tele_exporter.measure.seed_probes import _fold, _Groups, _Measured

    sums = _Groups(groups=(0, 1, 0), seeds=(("0", "s"),), numels=(7, 2))
    on = torch.tensor
    meta_seed = _Measured(sums, (0, 1, 2), (on(3.0), on(4.0, device="meta"), on(math.nan)))
    meta_host = _Measured(sums, (2, 1, 0), (on(1.0, device="meta"), on(6.0), on(2.0)))
    block = _fold([meta_seed, meta_host])
    assert len(block) == 2 and block.size == 4 and block.numels == ((7, 2), (7, 2))
    cpu, meta = block.squares
    assert meta.device.type == "meta" and meta.shape == (4,) and cpu.dtype == torch.float64
    host_first, seed_first, host_second, seed_second = cpu.tolist()
    assert math.isnan(host_first) and seed_first == 0.0  # the NaN stays in the host's sum; the seed's is on meta
    assert (host_second, seed_second) == (4.0, 36.0)  # the host's other norm (1.0) is on meta
    ((_, numels, values),) = list(block.per_pass(cpu))[1:]
    assert numels == (7, 2) and values.tolist() == [4.0, 36.0]
    (single,) = _fold([_Measured(sums, (2, 1, 0), (torch.tensor(1.0), torch.tensor(6.0), torch.tensor(2.0)))]).squares
    assert single.tolist() == [5.0, 36.0]
