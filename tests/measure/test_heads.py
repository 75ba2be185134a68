"""Head specs: action heads and other groups, whole modules or row slices, and the errors that name the head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tele_exporter import Telemetry
from tele_exporter.measure.heads import ACTION, OTHER, resolve_heads

from ..conftest import TinyPolicy


def test_heads_then_groups_with_their_kind_and_rows(policy: TinyPolicy) -> None:
    heads = resolve_heads(
        {"move": (policy.op, slice(0, 3)), "fire": (policy.op, slice(-1, None)), "slot": policy.slot},
        {"value": policy.value},
    )
    assert [(h.name, h.kind, h.rows) for h in heads] == [
        ("move", ACTION, (0, 3)),
        ("fire", ACTION, (3, 4)),
        ("slot", ACTION, None),
        ("value", OTHER, None),
    ]
    assert heads[0].params == (policy.op.weight, policy.op.bias)


def test_overlapping_slices_are_allowed(policy: TinyPolicy) -> None:
    heads = resolve_heads({"a": (policy.op, slice(0, 3)), "b": (policy.op, slice(2, 4)), "all": policy.op}, None)
    assert [h.rows for h in heads] == [(0, 3), (2, 4), None]


@pytest.mark.parametrize(
    ("rows", "error", "match"),
    [
        (slice(0, 5), ValueError, r"head 'bad': row slice slice\(0, 5, None\) is empty or out of range for Linear's 4"),
        (slice(3, 3), ValueError, r"head 'bad': .* is empty or out of range"),
        (slice(-5, None), ValueError, r"head 'bad': .* out of range"),
        (slice(0, 4, 2), ValueError, r"head 'bad': row slice .* has step 2; only contiguous rows"),
        (slice(0.0, 2), TypeError, r"head 'bad': row slice .* not an int"),
    ],
)
def test_a_bad_slice_is_refused_naming_the_head(
    policy: TinyPolicy, rows: slice, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Telemetry(policy, heads={"ok": policy.slot, "bad": (policy.op, rows)})


def test_a_slice_of_a_module_without_rows_is_refused_naming_the_head() -> None:
    policy = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"group 'critic': a row slice needs a module with a weight .* ReLU has none"):
        Telemetry(policy, heads={"x": policy[0]}, groups={"critic": (policy[1], slice(0, 1))})
    with pytest.raises(ValueError, match=r"head 'both': a row slice needs a module without submodule parameters"):
        Telemetry(policy, heads={"both": (_Wrapped(policy[2]), slice(0, 1))})


class _Wrapped(nn.Module):
    """A weight of its own and a submodule with more parameters."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 4))
        self.inner = inner


@pytest.mark.parametrize(
    ("heads", "groups", "error", "match"),
    [
        ({}, None, TypeError, "non-empty mapping"),
        ({"op": "op"}, None, TypeError, r"head 'op' is a str, not an nn.Module or an \(nn.Module, slice\) pair"),
        ({"op": (nn.Linear(1, 1), 0, 1)}, None, TypeError, r"head 'op' is a tuple"),
        ({"op": ("x", slice(0, 1))}, None, TypeError, r"head 'op' slices a str"),
        ({"": nn.Linear(1, 1)}, None, TypeError, "non-empty strings"),
        ({"op": nn.Linear(1, 1)}, {"op": nn.Linear(1, 1)}, ValueError, "head 'op' is named twice"),
        ({"op": nn.Linear(1, 1)}, [nn.Linear(1, 1)], TypeError, "groups must be a mapping"),
    ],
)
def test_bad_specs_are_refused(heads: object, groups: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        resolve_heads(heads, groups)  # type: ignore[arg-type]


def test_a_group_outside_the_policy_is_refused(policy: TinyPolicy) -> None:
    with pytest.raises(ValueError, match="head 'critic' has parameters that are not part of the policy"):
        Telemetry(policy, heads={"op": policy.op}, groups={"critic": nn.Linear(2, 1)})
