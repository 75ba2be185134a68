"""Layers: which modules Telemetry(layers=...) measures, by which names, and the cap that refuses loudly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tele_exporter import Telemetry
from tele_exporter.measure.layers import DEFAULT_MAX_LAYERS, LAYER, ROOT, resolve_layers

from ..conftest import TinyPolicy


class Gaussian(nn.Module):
    """A policy that owns a parameter itself (log_std) beside its submodules, and ties one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
        self.mu = nn.Linear(4, 2)
        self.log_std = nn.Parameter(torch.zeros(2))
        self.tied = nn.Linear(3, 4)
        self.tied.weight = self.body[0].weight  # type: ignore[assignment]  # shared: counted in the first layer only


def test_layers_true_names_every_module_that_owns_parameters_by_its_path() -> None:
    policy = Gaussian()
    layers = resolve_layers(policy, True, DEFAULT_MAX_LAYERS)
    assert [layer.name for layer in layers] == [ROOT, "body.0", "body.2", "mu", "tied"]
    assert {layer.kind for layer in layers} == {LAYER}
    by_name = {layer.name: layer.params for layer in layers}
    assert by_name[ROOT] == (policy.log_std,)
    assert by_name["tied"] == (policy.tied.bias,)  # its weight is body.0's
    every = [p for layer in layers for p in layer.params]
    assert len(every) == len({id(p) for p in every}) == len(list(policy.parameters()))


def test_a_mapping_groups_modules_under_the_users_names(policy: TinyPolicy) -> None:
    layers = resolve_layers(policy, {"trunk": policy.trunk, "heads": nn.ModuleList([policy.op, policy.slot])}, 4)
    assert [(layer.name, len(layer.params)) for layer in layers] == [("trunk", 2), ("heads", 4)]


@pytest.mark.parametrize("off", [None, False])
def test_no_layers_by_default(policy: TinyPolicy, off: bool | None) -> None:
    assert resolve_layers(policy, off, DEFAULT_MAX_LAYERS) == []


def test_the_cap_refuses_loudly_naming_the_count_the_cap_and_how_to_group() -> None:
    deep = nn.Sequential(*(nn.Linear(2, 2) for _ in range(12)))
    with pytest.raises(ValueError) as caught:
        Telemetry(deep, heads={"out": deep[11]}, layers=True, max_layers=10)
    message = str(caught.value)
    assert "12 layers" in message and "cap of 10" in message
    assert "layers={name: module}" in message and "max_layers" in message
    tele = Telemetry(deep, heads={"out": deep[11]}, layers=True, max_layers=12)  # at the cap: accepted
    assert len(tele._layers) == 12
    tele.close()


@pytest.mark.parametrize(
    ("layers", "error", "says"),
    [
        ({"a": "trunk"}, TypeError, "layer 'a' is a str, not an nn.Module"),
        ({"": nn.Linear(1, 1)}, TypeError, "non-empty strings"),
        ("all", TypeError, "layers must be True, False, None or a mapping"),
        ({"stranger": nn.Linear(2, 2)}, ValueError, "layer 'stranger' has parameters that are not part of the policy"),
    ],
)
def test_bad_layers_raise_naming_the_culprit(
    policy: TinyPolicy, layers: object, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says.replace("(", r"\(").replace(")", r"\)")):
        Telemetry(policy, heads={"op": policy.op}, layers=layers)  # type: ignore[arg-type]


def test_max_layers_must_be_a_positive_int(policy: TinyPolicy) -> None:
    with pytest.raises(ValueError, match="max_layers must be a positive int, got 0"):
        Telemetry(policy, heads={"op": policy.op}, layers=True, max_layers=0)
