"""DispatchCounter: kernel-launching ops and host reads are counted; views and allocations are not."""

from __future__ import annotations

import torch

from tele_exporter.measure.dispatch_counter import DispatchCounter


def test_launches_views_allocations_and_reads() -> None:
    x = torch.arange(6.0)
    with DispatchCounter() as c:
        y = x.view(2, 3)[0]  # views: no launch
        z = torch.empty(3)  # an allocation: no launch
        z.copy_(y)  # one launch
        w = (z * 2).sum()  # two launches
        w.item()  # a host read
        z.tolist()  # a host read outside the dispatcher
    assert c.ops == {"copy_": 1, "mul": 1, "sum": 1, "_local_scalar_dense": 1}
    assert c.launches == 3 and c.reads == 2


def test_the_tensor_methods_are_restored_on_exit() -> None:
    original = torch.Tensor.tolist
    with DispatchCounter():
        assert torch.Tensor.tolist is not original
    assert torch.Tensor.tolist is original
