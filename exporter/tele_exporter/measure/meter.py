"""The per-step hot path: per-head and global gradient norms from the clip's own fused pass.

The common case (one device, one dtype, no sharding) costs what torch's
`clip_grad_norm_` costs and nothing more: the per-tensor norms of one
`torch._foreach_norm` are written with `stack(out=)` into a row of an update-long
buffer, the total is the norm of that row, and the clip is torch's own sequence of
ops. Per-head sums, post-clip norms and everything else come from one batched fold
of the buffer at publish (or every FOLD_ROWS steps, which bounds its memory), in
float64: the numbers are those of a per-step float64 reduction. No host sync per step.

Other steps (sharded DTensor gradients, several devices or dtypes, foreach=False)
take the general path: per-head float64 sums per step with one `index_add_`,
reduced once per device mesh (see sharding.py), written to a row of their own. A
row is kept only after its step was measured in full, so a failure records nothing
rather than a 0.0. A head that is a row slice of a module adds row views (`narrow`,
no copy) of its parameters' gradients to the same fused norm call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .heads import Head
from .norms import CLIP_EPS, clip_coefficient, host_tensor, index_tensor, norm_dtype, tensor_norms, use_foreach
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
FOLD_ROWS = 1024
"""Fast-path steps whose per-tensor norms are held before they are folded into per-head rows."""


@dataclass(frozen=True)
class _Plan:
    """What one pattern of present gradients needs: (tensor, head) pairs and which heads have data."""

    tensor_index: Tensor  # [P] which norm input each pair reads: a present gradient, or one of `views`
    sum_index: Tensor  # [P] which sum it adds to: row r (0 local, 1 + k mesh k) x (head, or H for the total)
    present: tuple[bool, ...]  # per head: has at least one gradient in this pattern
    sharding: Sharding  # which gradients are counted here, and the reductions of each device mesh
    views: tuple[tuple[int, int, int], ...]  # (present gradient, first row, rows) of each row-slice view
    fast: bool  # one device, one dtype, no DTensor: the per-tensor norms go to a NormRows buffer
    grads: int  # present gradients: the first `grads` norm inputs make the total, the views follow


class NormRows:
    """The fast path's per-tensor norms of one presence pattern, one row per step, until folded."""

    def __init__(self, plan: _Plan, width: int, dtype: torch.dtype, device: torch.device) -> None:
        self.plan = plan
        self.buffer = torch.empty(min(_INITIAL_ROWS, FOLD_ROWS), width, dtype=dtype, device=device)
        self.count = 0
        self.max_norms: list[float] = []  # per step: the clip's max_norm, NaN for observe_gradients
        self.steps: list[int] = []  # per row: its measure call's index within the update (host ints)

    def next_row(self) -> Tensor:
        """The row the next step writes; the buffer doubles up to FOLD_ROWS (a full one is folded first)."""
        if self.count == self.buffer.shape[0]:
            grown = torch.empty(
                2 * self.count, self.buffer.shape[1], dtype=self.buffer.dtype, device=self.buffer.device
            )
            grown[: self.count] = self.buffer
            self.buffer = grown
        return self.buffer[self.count]


@dataclass(frozen=True)
class Drained:
    """The steps recorded since the last drain, still on the device.

    rows[s] = (head norms..., layer norms..., pre-clip total, post-clip total) of row s;
    present[s][g] tells whether group g (a head, then a layer) had any gradient there, and
    steps[s] which measure call of the update (0-based) row s is: rows are grouped by path
    and presence pattern, not in step order.
    """

    rows: Tensor
    present: list[tuple[bool, ...]]
    steps: list[int]


class GradientMeter:
    """Measures (and optionally clips) a policy's gradients per step, per head, per layer and in total.

    Layers are groups like heads, after them: their columns come from the same per-tensor
    norms (the fast path's fold, or the general path's one index_add_), so they cost no launch per step.
    """

    def __init__(self, params: Sequence[nn.Parameter], heads: Sequence[Head], layers: Sequence[Head] = ()):
        self.params = list(params)
        groups = [*heads, *layers]
        self.head_names = [h.name for h in groups]  # every measured group: the heads, then the layers
        self.layers = len(layers)
        index = {id(p): i for i, p in enumerate(self.params)}
        self._membership: list[list[int]] = [[] for _ in self.params]
        self._slices: list[list[tuple[int, int, int]]] = [[] for _ in self.params]  # (head, start, stop)
        for h, head in enumerate(groups):
            for p in head.params:
                if head.rows is None:
                    self._membership[index[id(p)]].append(h)
                else:
                    self._slices[index[id(p)]].append((h, *head.rows))
        self._plans: dict[tuple[bool, ...], _Plan] = {}
        self._norm_rows: dict[tuple[bool, ...], NormRows] = {}  # the fast path's steps, by presence pattern
        # fast-path rows folded before the drain, with their presence patterns and step indices
        self._folded: list[tuple[Tensor, list[tuple[bool, ...]], list[int]]] = []
        self._rows: Tensor | None = None  # the general path's rows
        self._present: list[tuple[bool, ...]] = []
        self._steps: list[int] = []  # the general path's rows' step indices
        self._calls = 0  # measure calls since the last drain: the next call's step index

    @property
    def width(self) -> int:
        """Columns of a row: one per head and layer, then pre-clip and post-clip totals."""
        return len(self.head_names) + 2

    @torch.no_grad()
    def measure(
        self,
        max_norm: float | None,
        *,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
        scale: bool = True,
    ) -> Tensor:
        """Record this step's norms; clip in place when max_norm is given. Returns the pre-clip norm.

        With scale=False no gradient is touched, but the post-clip norm recorded is still
        what a clip at max_norm leaves: for a library that clips by global norm itself.

        Nothing is recorded, and no gradient touched, unless every part succeeds: a
        step whose measurement raises is missing, never 0.0. With error_if_nonfinite
        a non-finite total raises before the gradients are scaled, as torch does.
        A step without any gradient records nothing and returns 0.0, as torch does.
        Under sharding every rank of a mesh must measure the same steps, as with torch's clip.
        Runs under no_grad, as torch's clip does: after backward(create_graph=True) the
        returned norm and the row buffer stay outside the autograd graph.
        """
        step = self._calls  # the step index within the update, counted whether or not the step is recorded
        self._calls += 1
        grads = [p.grad for p in self.params]
        key = tuple(g is not None for g in grads)
        present_grads = [g for g in grads if g is not None]
        if not present_grads:
            return torch.zeros((), dtype=torch.float64)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._build_plan(key, present_grads)
        if plan.fast and foreach is not False and use_foreach(present_grads, present_grads[0].device, foreach):
            return self._measure_fast(key, plan, present_grads, max_norm, error_if_nonfinite, scale, step)
        parts = local_parts(present_grads, plan.sharding)
        inputs = norm_parts(present_grads, parts, plan.sharding)
        if plan.views:
            inputs = [*inputs, *(inputs[i].narrow(0, start, rows) for i, start, rows in plan.views)]
        norms = self._reduce(inputs, plan, foreach)
        h = len(self.head_names)
        pre = norms[h]
        if error_if_nonfinite and not bool(torch.isfinite(pre)):
            raise NonFiniteNormError(_nonfinite_message(pre))
        if max_norm is None:
            post = pre
        else:
            coef = clip_coefficient(pre, max_norm)
            if scale:
                _scale_(parts, coef, foreach)
            post = pre * coef
        row = self._next_row(pre.device)
        row[: h + 1].copy_(norms)
        row[h + 1].copy_(post)
        self._present.append(plan.present)
        self._steps.append(step)
        return pre  # a view of this call's own `norms`, never of the row buffer

    def _measure_fast(
        self,
        key: tuple[bool, ...],
        plan: _Plan,
        grads: list[Tensor],
        max_norm: float | None,
        error_if_nonfinite: bool,
        scale: bool = True,
        step: int = 0,
    ) -> Tensor:
        """torch's clip, op for op, with its per-tensor norms kept: 8 kernel launches, or 3 without clipping.

        `_foreach_norm`, `stack` (into this step's row), `linalg_vector_norm`, then the
        coefficient (add, reciprocal, mul, clamp) and `_foreach_mul_`. Returns torch's total norm.
        """
        rows = self._norm_rows.get(key)
        if rows is None:
            width = len(grads) + len(plan.views)
            rows = self._norm_rows[key] = NormRows(plan, width, norm_dtype(grads[0].dtype), grads[0].device)
        elif rows.count == FOLD_ROWS:
            self._folded.append((self._fold_rows(rows), [plan.present] * rows.count, rows.steps))
            rows.count, rows.max_norms, rows.steps = 0, [], []
        inputs = grads
        if plan.views:
            inputs = [*grads, *(grads[i].narrow(0, start, n) for i, start, n in plan.views)]
        row = rows.next_row()
        torch.stack(torch._foreach_norm(inputs, 2, dtype=rows.buffer.dtype), out=row)
        total: Tensor = torch.linalg.vector_norm(row[: plan.grads] if plan.views else row)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise NonFiniteNormError(_nonfinite_message(total))
        if max_norm is not None and scale:
            coef = torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)
            torch._foreach_mul_(grads, coef)
        rows.count += 1
        rows.max_norms.append(math.nan if max_norm is None else max_norm)
        rows.steps.append(step)
        return total

    def _fold_rows(self, rows: NormRows) -> Tensor:
        """Per-head rows [steps, H + 2] (float64) of the held per-tensor norms: one batched reduction.

        The same float64 squares and index_add_ as the general path's per step, for all steps at
        once; post-clip = pre * min(1, max_norm / (pre + 1e-6)), pre itself for observe_gradients.
        """
        plan, n, h = rows.plan, rows.count, len(self.head_names)
        device = rows.buffer.device
        squares = rows.buffer[:n].to(torch.float64).square()
        sums = torch.zeros(n, h + 1, dtype=torch.float64, device=device)
        sums.index_add_(1, plan.sum_index, squares.index_select(1, plan.tensor_index))
        norms = sums.sqrt()
        pre = norms[:, h]
        max_norms = host_tensor(rows.max_norms, torch.float64, device)
        post = torch.where(max_norms.isnan(), pre, pre * clip_coefficient(pre, max_norms))
        return torch.cat([norms, post.unsqueeze(1)], dim=1)

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
        """Hand over the recorded steps and start afresh; None when nothing was recorded.

        The fast path's steps are folded here, one batched reduction per presence pattern;
        their buffers stay allocated for the next update. Steps of the two paths may come
        in any order: everything published from them is a mean, a count or a histogram.
        """
        parts, present = [rows for rows, _, _ in self._folded], [p for _, ps, _ in self._folded for p in ps]
        steps = [s for _, _, ss in self._folded for s in ss]
        self._folded = []
        self._calls = 0
        for rows in self._norm_rows.values():
            if rows.count:
                parts.append(self._fold_rows(rows))
                present.extend([rows.plan.present] * rows.count)
                steps.extend(rows.steps)
                rows.count, rows.max_norms, rows.steps = 0, [], []
        if self._present and self._rows is not None:
            parts.append(self._rows[: len(self._present)])
            present.extend(self._present)
            steps.extend(self._steps)
            self._rows, self._present, self._steps = None, [], []
        if not parts:
            return None
        first = parts[0].device
        return Drained(parts[0] if len(parts) == 1 else torch.cat([p.to(first) for p in parts]), present, steps)

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
        fast = not sharding.dtensors and len({(g.device, g.dtype) for g in present_grads}) == 1
        return _Plan(
            index_tensor(tensors, device),
            index_tensor(outputs, device),
            tuple(has),
            sharding,
            tuple(views),
            fast,
            len(present_grads),
        )


def _unwritten(n: int, width: int, device: torch.device) -> Tensor:
    """Row storage filled with NaN, so a row read before it is written can never pass for a measured 0.0."""
    return torch.full((n, width), math.nan, dtype=torch.float64, device=device)


class NonFiniteNormError(RuntimeError):
    """The total gradient norm is NaN or Inf and the caller asked clip_grad_norm_ to raise."""


def _nonfinite_message(total: Tensor) -> str:
    """torch's own message for error_if_nonfinite."""
    return (
        f"The total norm of order 2.0 for gradients from `parameters` is non-finite ({float(total)}), "
        "so it cannot be clipped. To disable this error and scale the gradients by the non-finite "
        "norm anyway, set `error_if_nonfinite=False`"
    )


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
