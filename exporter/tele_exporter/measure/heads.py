"""What Telemetry measures per head: action heads (the CV's inputs) and other groups, whole modules or row slices.

A head is a module (all its parameters) or `(module, slice)`: rows `slice` of the
module's output, i.e. those rows of its weight and the matching bias entries, as
when one `nn.Linear` produces the logits of every sub-action. Action heads enter
TELE-330's CV; other groups (a critic, a value head, a shared trunk) are measured,
exported and alerted on like heads, with kind="other", but left out of the CV.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias

from torch import nn

HeadSpec: TypeAlias = nn.Module | tuple[nn.Module, slice]
"""A head as the user names it: a module, or a module and a slice of its output rows."""

ACTION = "action"
"""kind of an action head: measured, exported and part of the gradient CV (TELE-330)."""
OTHER = "other"
"""kind of another measured group (critic, value head, trunk): measured and exported, never in the CV."""


@dataclass(frozen=True)
class Head:
    """One measured head: its parameters and, for a row slice, the rows [start, stop) of each."""

    name: str
    kind: str  # ACTION or OTHER
    params: tuple[nn.Parameter, ...]
    rows: tuple[int, int] | None = None  # None: whole parameters


def resolve_heads(heads: Mapping[str, HeadSpec], groups: Mapping[str, HeadSpec] | None) -> list[Head]:
    """Action heads in order, then other groups; raises naming the head whose spec is wrong."""
    if not isinstance(heads, Mapping) or not heads:
        raise TypeError("heads must be a non-empty mapping of head name to nn.Module or (nn.Module, slice)")
    if groups is not None and not isinstance(groups, Mapping):
        raise TypeError("groups must be a mapping of group name to nn.Module or (nn.Module, slice)")
    out: list[Head] = []
    for kind, specs in ((ACTION, heads), (OTHER, groups or {})):
        for name, spec in specs.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"head names must be non-empty strings, got {name!r}")
            if any(h.name == name for h in out):
                raise ValueError(f"head {name!r} is named twice; heads and groups share one namespace")
            out.append(_resolve(name, kind, spec))
    return out


def _resolve(name: str, kind: str, spec: HeadSpec) -> Head:
    what = "head" if kind == ACTION else "group"
    if isinstance(spec, nn.Module):
        return Head(name, kind, tuple(dict.fromkeys(spec.parameters())))
    if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], slice)):
        raise TypeError(f"{what} {name!r} is a {type(spec).__name__}, not an nn.Module or an (nn.Module, slice) pair")
    module, rows = spec
    if not isinstance(module, nn.Module):
        raise TypeError(f"{what} {name!r} slices a {type(module).__name__}, not an nn.Module")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() == 0:
        raise ValueError(
            f"{what} {name!r}: a row slice needs a module with a weight parameter (e.g. nn.Linear); "
            f"{type(module).__name__} has none"
        )
    own = tuple(dict.fromkeys(module.parameters(recurse=False)))
    if len(own) != len(tuple(dict.fromkeys(module.parameters()))):
        raise ValueError(f"{what} {name!r}: a row slice needs a module without submodule parameters")
    n = weight.shape[0]
    odd = [p for p in own if p.dim() == 0 or p.shape[0] != n]
    if odd:
        raise ValueError(
            f"{what} {name!r}: every parameter of a sliced module must have {n} rows like its weight; "
            f"one has shape {tuple(odd[0].shape)}"
        )
    return Head(name, kind, own, _rows(what, name, rows, n, type(module).__name__))


def _rows(what: str, name: str, rows: slice, n: int, module: str) -> tuple[int, int]:
    """[start, stop) of a slice over n output rows; a step, an empty or an out-of-range slice is refused."""
    if rows.step not in (None, 1):
        raise ValueError(f"{what} {name!r}: row slice {rows} has step {rows.step}; only contiguous rows (step 1)")
    bounds = []
    for value, default in ((rows.start, 0), (rows.stop, n)):
        if value is None:
            bounds.append(default)
        elif not isinstance(value, numbers.Integral) or isinstance(value, bool):  # numpy ints are Integral
            raise TypeError(f"{what} {name!r}: row slice {rows} has a bound that is not an int")
        else:
            bounds.append(int(value) + n if value < 0 else int(value))
    start, stop = bounds
    if not 0 <= start < stop <= n:
        raise ValueError(f"{what} {name!r}: row slice {rows} is empty or out of range for {module}'s {n} output rows")
    return start, stop
