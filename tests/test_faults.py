"""The fault matrix: for each condition, training goes on (or a user mistake raises at
construction), the condition is counted or reported, and nothing already published is lost."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from tele_exporter import CatalogError, PortInUseError, Telemetry, load_catalog, serve
from tele_exporter.snapshot import Snapshot

from .conftest import TinyPolicy, backward


def _publish_one(tele: Telemetry, policy: TinyPolicy) -> Snapshot:
    with tele.update() as upd:
        backward(policy)
        upd.clip_grad_norm_(1.0)
        upd.observe_kl({"op": torch.full((4,), 0.1)})
    return tele.snapshot()


def _still_has(before: Snapshot, after: Snapshot) -> None:
    """Nothing already published is lost: counters and histories carry on from `before`."""
    assert after.updates == before.updates + 1
    assert after.kl_history[:-1] == before.kl_history[-(len(after.kl_history) - 1) :]
    assert after.head("op").prev == before.head("op").current
    for fam, series in before.histograms.items():
        for labels, state in series.items():
            assert after.histograms[fam][labels].count >= state.count


def _faulty_update(tele: Telemetry, policy: TinyPolicy, fault: Callable[[], None]) -> Snapshot:
    before = _publish_one(tele, policy)
    with tele.update() as upd:
        backward(policy)
        fault()
        upd.clip_grad_norm_(1.0)
        upd.observe_kl({"op": torch.full((4,), 0.1)})
    after = tele.snapshot()
    _still_has(before, after)
    return after


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_gradients_in_one_head(tele: Telemetry, policy: TinyPolicy, bad: float) -> None:
    def fault() -> None:
        policy.slot.bias.grad[0] = bad  # type: ignore[index]

    after = _faulty_update(tele, policy, fault)
    assert after.head("slot").nonfinite_total == 1
    assert not math.isfinite(after.head("slot").current)
    assert math.isfinite(after.head("op").current)


def test_none_gradients(tele: Telemetry, policy: TinyPolicy) -> None:
    def fault() -> None:
        for p in policy.parameters():
            p.grad = None

    after = _faulty_update(tele, policy, fault)
    assert math.isnan(after.head("op").current) and math.isnan(after.head("slot").current)
    assert after.grad_norm_pre is None and after.steps == 0  # nothing measured: missing, never 0.0


def test_head_without_parameters(policy: TinyPolicy) -> None:
    tele = Telemetry(policy, heads={"op": policy.op, "empty": nn.Sequential()})
    after = _faulty_update(tele, policy, lambda: None)
    assert math.isnan(after.head("empty").current)
    tele.close()


def test_seed_whose_input_does_not_require_grad(tele: Telemetry, policy: TinyPolicy) -> None:
    seed = nn.Linear(6, 6)
    tele.watch_seed(seed, host=policy, env=0, slot="s")
    after = _faulty_update(tele, policy, lambda: seed(torch.randn(2, 6)).sum().backward())
    assert after.seed("0", "s").ratio == 0.0 and after.seed("0", "s").shown.label == "no data"


def test_in_place_ops_inside_a_seed(tele: Telemetry, policy: TinyPolicy) -> None:
    class InPlace(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * 2.0).add_(1.0).mul_(2.0)

    seed = InPlace()
    tele.watch_seed(seed, host=policy, env=0, slot="s", backward_gain=True)
    x = torch.rand(3, 4, requires_grad=True)
    after = _faulty_update(tele, policy, lambda: seed(x).sum().backward())
    assert after.seed("0", "s").backward_gain == pytest.approx(4.0)  # y = 2(2x + 1): dy/dx = 4


def test_an_exception_raised_inside_a_hook(
    tele: Telemetry, policy: TinyPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tele_exporter.measure.seed_probes as hooks

    seed = nn.Linear(4, 4)
    tele.watch_seed(seed, host=policy, env=0, slot="s", backward_gain=True)
    x = torch.randn(2, 4, requires_grad=True)

    def boom(grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected")

    monkeypatch.setattr(hooks, "_gain_norm", boom)
    after = _faulty_update(tele, policy, lambda: seed(x).sum().backward())
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert tele.errors()["seed_hook"] == 2
    assert after.seed("0", "s").backward_gain is None


def test_a_scrape_during_publish(tele: Telemetry, policy: TinyPolicy, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scrape that lands in the middle of a publish sees the previous update, whole."""
    from prometheus_client import generate_latest

    before = _publish_one(tele, policy)
    seen: list[bytes] = []
    original = tele._fold._fold_rows

    def scrape_midway(*args: object) -> object:
        seen.append(generate_latest(tele.registry))
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(tele._fold, "_fold_rows", scrape_midway)
    _publish_one(tele, policy)
    assert f"tele_ppo_updates_total {float(before.updates)}".encode() in seen[0]
    assert repr(before.head("op").current).encode() in seen[0]


def test_a_failing_publish_keeps_the_last_snapshot(
    tele: Telemetry, policy: TinyPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _publish_one(tele, policy)

    def boom(*args: object) -> object:
        raise RuntimeError("injected")

    monkeypatch.setattr(tele._fold, "_fold_rows", boom)
    with tele.update() as upd:
        backward(policy)
        upd.clip_grad_norm_(1.0)
    assert tele.snapshot() is before
    assert tele.errors() == {"publish": 1}


def test_the_server_port_already_taken(tele: Telemetry) -> None:
    first = serve(tele, port=0)
    try:
        with pytest.raises(PortInUseError, match=f"127.0.0.1:{first.port}"):
            serve(tele, port=first.port)
    finally:
        first.close()


def test_the_catalog_missing_or_malformed(tmp_path: Path, policy: TinyPolicy) -> None:
    with pytest.raises(CatalogError, match="cannot read the catalog"):
        load_catalog(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("namespace: tele\ncolours: {}\nmetrics: {}\n")
    with pytest.raises(CatalogError, match="colours: needs a colour for 'ok'"):
        Telemetry(policy, heads={"op": policy.op}, catalog=load_catalog(broken))
