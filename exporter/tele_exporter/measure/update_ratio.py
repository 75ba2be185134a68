"""The update-to-weight ratio |theta_after - theta_before| / |theta_before| of one PPO update, per head and layer.

One fused device copy of the parameters when an update opens (`take`, a single
`_foreach_copy_` into buffers kept across updates), nothing per optimizer step, and at
publish a fixed handful of batched ops (`sums`): the per-tensor norms of the copy, the
copy minus the parameters in place, their per-tensor norms, and one index_add_ into
per-group float64 sums. The cost is memory: one copy of the policy's parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .heads import Head
from .norms import index_tensor, tensor_norms


class WeightDelta:
    """Per-group squared norms of the weights before an update and of the update itself, on the device.

    Groups are heads (a row slice counts only its rows) and layers. Sharded parameters
    (DTensor) are not measured: their norms need a reduction across the mesh, so
    `sums()` returns None there and the ratios are missing, never a shard's.
    """

    def __init__(self, params: Sequence[nn.Parameter], groups: Sequence[Head]) -> None:
        self.params = list(params)
        self.groups = len(groups)
        index = {id(p): i for i, p in enumerate(self.params)}
        tensors: list[int] = []  # which input each (input, group) pair reads: a parameter, or a row-slice view
        outputs: list[int] = []
        self._views: list[tuple[int, int, int]] = []  # (parameter, first row, rows) of each row-slice view
        for g, head in enumerate(groups):
            for p in head.params:
                if head.rows is None:
                    tensors.append(index[id(p)])
                else:
                    start, stop = head.rows
                    tensors.append(len(self.params) + len(self._views))
                    self._views.append((index[id(p)], start, stop - start))
                outputs.append(g)
        self._pairs = (tensors, outputs)
        self.sharded = _any_dtensor(self.params)
        self._before: list[Tensor] | None = None
        self._taken = False

    @torch.no_grad()
    def take(self) -> None:
        """Copy the parameters as they are now, the start of an update: one fused copy, no host sync.

        Parameters that hold a DTensor by now (`.data` swapped after Telemetry was built) are not measured from then on.
        """
        if not self.params or not self.groups:
            return
        self.sharded = self.sharded or _any_dtensor(self.params)
        if self.sharded:
            self._taken = False
            return
        before = self._before
        if before is None or any(_layout(b) != _layout(p) for b, p in zip(before, self.params, strict=True)):
            before = self._before = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in self.params]
        torch._foreach_copy_(before, [p.detach() for p in self.params])
        self._taken = True

    @torch.no_grad()
    def sums(self) -> Tensor | None:
        """[2, groups] float64: row 0 the squared norm of each group's weights at `take`, row 1 of its change since.

        None when no copy was taken (sharded parameters, or no take() since the last call).
        The copy is overwritten with its difference from the parameters: take() refills it.
        """
        before = self._before
        if not self._taken or before is None:
            return None
        self._taken = False
        inputs = [*before, *(before[i].narrow(0, start, rows) for i, start, rows in self._views)]
        weights = tensor_norms(inputs)
        torch._foreach_sub_(before, [p.detach() for p in self.params])
        deltas = tensor_norms(inputs)
        device = weights.device
        tensors, outputs = (index_tensor(ix, device) for ix in self._pairs)
        squares = torch.stack([weights, deltas.to(device)]).square()
        out = torch.zeros(2, self.groups, dtype=torch.float64, device=device)
        return out.index_add_(1, outputs, squares.index_select(1, tensors))


def _layout(t: Tensor) -> tuple[torch.device, torch.dtype, torch.Size]:
    return t.device, t.dtype, t.shape


def _any_dtensor(params: Sequence[nn.Parameter]) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return False
    return any(isinstance(p, DTensor) or isinstance(p.data, DTensor) for p in params)
