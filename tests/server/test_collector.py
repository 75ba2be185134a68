"""collector: families come from the catalog and one snapshot; const labels; histograms."""

from __future__ import annotations

import math

import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tele_exporter import Telemetry
from tele_exporter.catalog import default_catalog

from ..conftest import TinyPolicy, backward


def _families(registry: CollectorRegistry) -> dict[str, object]:
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_before_the_first_update_only_counters_and_histograms_are_exported(policy: TinyPolicy) -> None:
    registry = CollectorRegistry()
    Telemetry(policy, heads={"op": policy.op}, registry=registry)
    samples = _samples(registry)
    assert samples[("tele_ppo_updates_total", ())] == 0.0
    assert not any(name == "tele_head_grad_norm" for name, _ in samples)
    assert not any(name == "tele_last_update_timestamp_seconds" for name, _ in samples)


def test_a_seed_watched_without_the_backward_gain_publishes_no_gain_series_not_zero(policy: TinyPolicy) -> None:
    """The gain is opt-in; a seed without it (the default) or without a pass with data has no sample at all."""
    registry = CollectorRegistry()
    tele = Telemetry(policy, heads={"op": policy.op}, registry=registry)
    host = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 1))
    tele.watch_seed(host[0], host=host, env=0, slot="plain")
    tele.watch_seed(host[1], host=host, env=0, slot="gain", backward_gain=True)
    assert not host[0]._forward_hooks and host[1]._forward_hooks  # no probe for the default watch
    with tele.update():
        host(torch.randn(2, 6)).sum().backward()
    samples = _samples(registry)
    gains = {labels: v for (name, labels), v in samples.items() if name == "tele_seed_backward_gain"}
    assert set(gains) == {(("env", "0"), ("slot", "gain"))} and gains[(("env", "0"), ("slot", "gain"))] > 0
    assert samples[("tele_seed_grad_ratio", (("env", "0"), ("slot", "plain")))] > 0
    assert tele.snapshot().seed("0", "plain").backward_gain is None


def test_every_catalog_metric_is_exported_with_catalog_type_and_help(policy: TinyPolicy) -> None:
    registry = CollectorRegistry()
    tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, registry=registry)
    seed, host = torch.nn.Linear(6, 6), torch.nn.Linear(6, 1)
    tele.watch_seed(seed, host=host, env=3, slot="r0c1", backward_gain=True)
    with tele.update() as upd:
        backward(policy)
        host(seed(torch.randn(2, 6, requires_grad=True))).sum().backward()
        upd.clip_grad_norm_(0.5)
        upd.observe_kl({"op": torch.full((4,), 0.1)})
    families = _families(registry)
    for spec in default_catalog():
        family = families[spec.family_name]
        assert family.type == spec.type, spec.id  # type: ignore[attr-defined]
        assert family.documentation == spec.help, spec.id  # type: ignore[attr-defined]
    samples = _samples(registry)
    assert samples[("tele_head_grad_norm", (("head", "op"), ("kind", "action")))] == tele.snapshot().head("op").current
    assert samples[("tele_policy_grad_norm", (("clip", "post"),))] <= 0.5 + 1e-6
    assert samples[("tele_seed_grad_ratio", (("env", "3"), ("slot", "r0c1")))] > 0
    assert samples[("tele_seed_backward_gain", (("env", "3"), ("slot", "r0c1")))] > 0
    assert samples[("tele_step_head_grad_norm_count", (("head", "op"), ("kind", "action")))] == 1
    assert samples[("tele_step_kl_divergence_bucket", (("le", "+Inf"),))] == 1


def test_histogram_buckets_are_the_catalog_edges(tele: Telemetry, policy: TinyPolicy) -> None:
    spec = default_catalog()["step_kl_divergence"]
    with tele.update() as upd:
        upd.observe_kl({"op": torch.full((4,), 0.17)})  # kl ~ 0.0153
    buckets = [
        (s.labels["le"], s.value)
        for f in text_string_to_metric_families(generate_latest(tele.registry).decode())
        if f.name == spec.name
        for s in f.samples
        if s.name.endswith("_bucket")
    ]
    assert [float(le) for le, _ in buckets] == [*spec.buckets, math.inf]
    kl = tele.snapshot().kl
    assert [v for _, v in buckets] == [1.0 if kl <= edge else 0.0 for edge in (*spec.buckets, math.inf)]


def test_const_labels_are_on_every_sample(policy: TinyPolicy) -> None:
    registry = CollectorRegistry()
    tele = Telemetry(policy, heads={"op": policy.op}, registry=registry, const_labels={"run": "exp-42"})
    with tele.update() as upd:
        backward(policy)
        upd.clip_grad_norm_(1.0)
    text = generate_latest(registry).decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert samples and all(s.labels.get("run") == "exp-42" for s in samples)


def test_telemetry_errors_are_exported_by_site(policy: TinyPolicy) -> None:
    registry = CollectorRegistry()
    tele = Telemetry(policy, heads={"op": policy.op}, registry=registry)
    tele.record_error("seed_hook", RuntimeError("x"))
    tele.record_error("seed_hook", RuntimeError("x"))
    assert _samples(registry)[("tele_telemetry_errors_total", (("site", "seed_hook"),))] == 2.0


def test_nan_values_are_exported_as_nan(policy: TinyPolicy) -> None:
    registry = CollectorRegistry()
    tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, registry=registry)
    with tele.update() as upd:
        backward(policy, heads=("op",))
        upd.clip_grad_norm_(1.0)
    assert math.isnan(_samples(registry)[("tele_head_grad_norm", (("head", "slot"), ("kind", "action")))])


def test_close_unregisters(policy: TinyPolicy) -> None:
    registry = CollectorRegistry()
    tele = Telemetry(policy, heads={"op": policy.op}, registry=registry)
    tele.close()
    assert generate_latest(registry) == b""


def test_layers_and_update_ratios_are_exported_as_measured_and_absent_when_missing(policy: TinyPolicy) -> None:
    """Per layer the norm (absent for a layer without gradient) and update ratio; the dead count; per head the ratio."""
    registry = CollectorRegistry()
    tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, registry=registry, layers=True)
    before = _samples(registry)
    assert not any(name in ("tele_layer_grad_norm", "tele_dead_layers") for name, _ in before)
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    with tele.update() as upd:
        backward(policy, heads=("op",))  # slot: no gradient this update
        upd.clip_grad_norm_(0.5)
        opt.step()
    samples = _samples(registry)
    snap = tele.snapshot()
    norms = {dict(labels)["layer"]: v for (name, labels), v in samples.items() if name == "tele_layer_grad_norm"}
    assert norms == {layer.name: layer.grad_norm for layer in snap.layers if layer.steps}
    assert set(norms) == {"trunk", "op", "value"}  # slot is missing: no series, never 0
    assert samples[("tele_dead_layers", ())] == 0.0
    ratios = {dict(labels)["layer"]: v for (name, labels), v in samples.items() if name == "tele_layer_update_ratio"}
    assert set(ratios) == {"trunk", "op", "slot", "value"} and ratios["slot"] == 0.0  # SGD left slot where it was
    assert samples[("tele_head_update_ratio", (("head", "op"), ("kind", "action")))] == snap.head("op").update_ratio
    plain = CollectorRegistry()
    Telemetry(policy, heads={"op": policy.op}, registry=plain, update_ratio=False)
    assert not any("layer" in name or "update_ratio" in name for name, _ in _samples(plain) if name != "tele_threshold")
