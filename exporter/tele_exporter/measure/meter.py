"""The per-step hot path: per-head and global gradient norms from one fused pass.

A `GradientMeter` measures the gradients of a policy at each optimizer step with
`torch._foreach_norm` (float64), one `index_add_` for every head's and the global
squared norm at once (a matrix product would let 0 * NaN leak a NaN from one head
into all others), and optionally clips in place like
`torch.nn.utils.clip_grad_norm_`. Results stay on the device in a row buffer that
the aggregator drains once per PPO update: no host synchronisation per step. A
row is reserved only after its step was measured in full, so a failure records
nothing rather than a 0.0. A head that is a row slice of a module adds row views
(`narrow`, no copy) of its parameters' gradients to the same `_foreach_norm` call.
Sharded (DTensor) gradients are measured on their local parts and reduced once per
device mesh (see sharding.py); row slices of gradients sharded by rows are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .heads import Head
from .norms import clip_coefficient, index_tensor, tensor_norms, use_foreach
from .sharding import (
    LOCAL,
    REPLICA,
    Sharding,
    all_reduce_,
    local_parts,
    norm_parts,
    plan_sharding,
    refuse_legacy_fsdp,
    refuse_sharded_rows,
)

_INITIAL_ROWS = 64


@dataclass(frozen=True)
class _Plan:
    """What one pattern of present gradients needs: (tensor, head) pairs and which heads have data."""

    tensor_index: Tensor  # [P] which norm input each pair reads: a present gradient, or one of `views`
    sum_index: Tensor  # [P] which sum it adds to: row r (0 local, 1 + k mesh k) x (head, or H for the total)
    present: tuple[bool, ...]  # per head: has at least one gradient in this pattern
    sharding: Sharding  # which gradients are counted here, and the reductions of each device mesh
    views: tuple[tuple[int, int, int], ...]  # (present gradient, first row, rows) of each row-slice view


@dataclass(frozen=True)
class Drained:
    """The steps recorded since the last drain, still on the device.

    rows[s] = (head norms..., pre-clip total, post-clip total) of step s;
    present[s][h] tells whether head h had any gradient at step s.
    """

    rows: Tensor
    present: list[tuple[bool, ...]]


class GradientMeter:
    """Measures (and optionally clips) a policy's gradients per step, per head and in total."""

    def __init__(self, params: Sequence[nn.Parameter], heads: Sequence[Head]):
        self.params = list(params)
        self.head_names = [h.name for h in heads]
        index = {id(p): i for i, p in enumerate(self.params)}
        self._membership: list[list[int]] = [[] for _ in self.params]
        self._slices: list[list[tuple[int, int, int]]] = [[] for _ in self.params]  # (head, start, stop)
        for h, head in enumerate(heads):
            for p in head.params:
                if head.rows is None:
                    self._membership[index[id(p)]].append(h)
                else:
                    self._slices[index[id(p)]].append((h, *head.rows))
        self._plans: dict[tuple[bool, ...], _Plan] = {}
        self._rows: Tensor | None = None
        self._present: list[tuple[bool, ...]] = []

    @property
    def width(self) -> int:
        """Columns of a row: one per head, then pre-clip and post-clip totals."""
        return len(self.head_names) + 2

    @torch.no_grad()
    def measure(
        self, max_norm: float | None, *, error_if_nonfinite: bool = False, foreach: bool | None = None
    ) -> Tensor:
        """Record this step's norms; clip in place when max_norm is given. Returns the pre-clip norm.

        Nothing is recorded, and no gradient touched, unless every part succeeds: a
        step whose measurement raises is missing, never 0.0. With error_if_nonfinite
        a non-finite total raises before the gradients are scaled, as torch does.
        A step without any gradient records nothing and returns 0.0, as torch does.
        Under sharding every rank of a mesh must measure the same steps, as with torch's clip.
        Runs under no_grad, as torch's clip does: after backward(create_graph=True) the
        returned norm and the row buffer stay outside the autograd graph.
        """
        grads = [p.grad for p in self.params]
        key = tuple(g is not None for g in grads)
        present_grads = [g for g in grads if g is not None]
        if not present_grads:
            return torch.zeros((), dtype=torch.float64)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._build_plan(key, present_grads)
        parts = local_parts(present_grads, plan.sharding)
        inputs = norm_parts(present_grads, parts, plan.sharding)
        if plan.views:
            inputs = [*inputs, *(inputs[i].narrow(0, start, rows) for i, start, rows in plan.views)]
        norms = self._reduce(inputs, plan, foreach)
        h = len(self.head_names)
        pre = norms[h]
        if error_if_nonfinite and not bool(torch.isfinite(pre)):
            raise NonFiniteNormError(
                f"The total norm of order 2.0 for gradients from `parameters` is non-finite ({float(pre)}), "
                "so it cannot be clipped. To disable this error and scale the gradients by the non-finite "
                "norm anyway, set `error_if_nonfinite=False`"
            )
        if max_norm is None:
            post = pre
        else:
            coef = clip_coefficient(pre, max_norm)
            _scale_(parts, coef, foreach)
            post = pre * coef
        row = self._next_row(pre.device)
        row[: h + 1].copy_(norms)
        row[h + 1].copy_(post)
        self._present.append(plan.present)
        return pre  # a view of this call's own `norms`, never of the row buffer

    def _reduce(self, parts: list[Tensor], plan: _Plan, foreach: bool | None = None) -> Tensor:
        """Per-head and global L2 norms [H + 1] (float64) of this step's gradients, one fused pass.

        The one place that turns per-tensor norms of local parts into totals: local
        sums, plus one all-reduced row of sums per device mesh of sharded gradients.
        """
        h = len(self.head_names)
        squares = tensor_norms(parts, foreach).square()
        reductions = plan.sharding.reductions
        sums = torch.zeros((1 + len(reductions)) * (h + 1), dtype=torch.float64, device=squares.device)
        sums.index_add_(0, plan.sum_index, squares.index_select(0, plan.tensor_index))
        if not reductions:
            return sums.sqrt()
        rows = sums.view(-1, h + 1)
        for k, groups in enumerate(reductions):
            all_reduce_(rows[1 + k], groups)
        return rows.sum(dim=0).sqrt()

    def drain(self) -> Drained | None:
        """Hand over the recorded steps and start afresh; None when nothing was recorded."""
        if not self._present or self._rows is None:
            return None
        drained = Drained(self._rows[: len(self._present)], self._present)
        self._rows, self._present = None, []
        return drained

    def _next_row(self, device: torch.device) -> Tensor:
        n = len(self._present)
        if self._rows is None or self._rows.device != device:
            rows = _unwritten(max(_INITIAL_ROWS, 2 * n), self.width, device)
            if self._rows is not None and n:
                rows[:n] = self._rows[:n].to(device)
            self._rows = rows
        elif n == self._rows.shape[0]:
            rows = _unwritten(2 * n, self.width, device)
            rows[:n] = self._rows
            self._rows = rows
        return self._rows[n]

    def _build_plan(self, key: tuple[bool, ...], present_grads: list[Tensor]) -> _Plan:
        h = len(self.head_names)
        device = present_grads[0].device if present_grads else torch.device("cpu")
        refuse_legacy_fsdp(self.params)  # wrapped in legacy FSDP after Telemetry was built
        sharding = plan_sharding(present_grads)
        tensors: list[int] = []
        outputs: list[int] = []
        views: list[tuple[int, int, int]] = []
        sliced: list[tuple[int, int, int, int]] = []  # (present gradient, head, start, stop)
        has = [False] * h
        col = 0
        for i, is_present in enumerate(key):
            if not is_present:
                continue
            refuse_sharded_rows(present_grads[col], [self.head_names[s[0]] for s in self._slices[i]])
            slot = sharding.slots[col]
            if slot != REPLICA:
                row = 0 if slot == LOCAL else 1 + slot
                for out in (*self._membership[i], h):
                    tensors.append(col)
                    outputs.append(row * (h + 1) + out)
                sliced.extend((col, head, start, stop) for head, start, stop in self._slices[i])
            for head in (*self._membership[i], *(s[0] for s in self._slices[i])):
                has[head] = True
            col += 1
        for c, head, start, stop in sliced:  # views follow the present gradients among the norm inputs
            slot = sharding.slots[c]
            tensors.append(col + len(views))
            outputs.append((0 if slot == LOCAL else 1 + slot) * (h + 1) + head)
            views.append((c, start, stop - start))
        return _Plan(index_tensor(tensors, device), index_tensor(outputs, device), tuple(has), sharding, tuple(views))


def _unwritten(n: int, width: int, device: torch.device) -> Tensor:
    """Row storage filled with NaN, so a row read before it is written can never pass for a measured 0.0."""
    return torch.full((n, width), math.nan, dtype=torch.float64, device=device)


class NonFiniteNormError(RuntimeError):
    """The total gradient norm is NaN or Inf and the caller asked clip_grad_norm_ to raise."""


def _scale_(grads: list[Tensor], coef: Tensor, foreach: bool | None) -> None:
    """Multiply gradients in place by a 0-d tensor: one foreach call per device, or one mul_ each, as torch decides."""
    for device in dict.fromkeys(g.device for g in grads):
        on_device = [g for g in grads if g.device == device]
        factor = coef.to(device)
        if use_foreach(on_device, device, foreach):
            torch._foreach_mul_(on_device, factor)
        else:
            for g in on_device:
                g.mul_(factor)
