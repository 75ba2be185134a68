"""Sharded gradients (FSDP2, DTensor, tensor parallel): which local parts a rank counts, and one reduction per mesh.

A DTensor gradient's local tensor is this rank's part of the full gradient. Its
squared norm is counted only where no other rank counts the same part: at
coordinate 0 of every reduced mesh dimension it is replicated on. The squared
sums of each device mesh are then all-reduced once, over the dimensions some
gradient of that mesh is sharded on: the reduction torch's clip_grad_norm_ issues
for the same gradients, not one more. Plain tensors and DTensors replicated on
every dimension are whole on every rank and are counted without a collective.
Legacy FullyShardedDataParallel is refused: its flat shards cannot be told apart by head.
A head that is a row slice of a gradient sharded by rows (FSDP2's default Shard(0)) is
refused too: a rank's local rows are not the slice's rows. Sharded on another dimension
or replicated, every rank holds all rows of its part and the slice is measured exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LOCAL = -1
"""The gradient is whole on this rank: counted without a reduction."""
REPLICA = -2
"""The gradient is a copy of a part another rank counts: scaled, never counted here."""

_dist_available = torch.distributed.is_available()
if _dist_available:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate


@dataclass(frozen=True)
class Sharding:
    """How one pattern of present gradients is counted on this rank."""

    slots: tuple[int, ...]  # per gradient: LOCAL, REPLICA, or the index of its mesh's reduction
    reductions: tuple[tuple[ProcessGroup | None, ...], ...]  # per mesh: the groups to all-reduce over, in turn
    partial: tuple[int, ...]  # gradients that are DTensors with pending (Partial) sums, made whole before the norm
    dtensors: bool  # whether any gradient is a DTensor; False keeps plain gradients on the plain path


def plan_sharding(grads: Sequence[Tensor]) -> Sharding:
    """Slots and reductions of these gradients; every rank of a mesh builds the same reductions in the same order."""
    n = len(grads)
    if not _dist_available or not any(isinstance(g, DTensor) for g in grads):
        return Sharding((LOCAL,) * n, (), (), False)
    meshes: dict[DeviceMesh, set[int]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            dims = meshes.setdefault(g.device_mesh, set())
            dims.update(d for d, p in enumerate(g.placements) if p.is_shard())
    reduced = [mesh for mesh, dims in meshes.items() if dims]
    slots: list[int] = []
    partial: list[int] = []
    for i, g in enumerate(grads):
        if not isinstance(g, DTensor):
            slots.append(LOCAL)
            continue
        mesh = g.device_mesh
        if any(p.is_partial() for p in g.placements):
            partial.append(i)
        dims = meshes[mesh]
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            raise ValueError(f"this rank is not part of the device mesh {mesh} of a gradient it holds")
        if not dims:
            slots.append(LOCAL)
        elif any(coordinate[d] != 0 and not g.placements[d].is_shard() for d in dims):
            slots.append(REPLICA)
        else:
            slots.append(reduced.index(mesh))
    reductions = tuple(_groups(mesh, sorted(meshes[mesh])) for mesh in reduced)
    return Sharding(tuple(slots), reductions, tuple(partial), True)


def _groups(mesh: DeviceMesh, dims: list[int]) -> tuple[ProcessGroup | None, ...]:
    """The groups that sum over `dims` of `mesh`: one dimension's group, the world (None) for a whole-world mesh."""
    if len(dims) == 1:
        return (mesh.get_group(dims[0]),)
    if len(dims) == mesh.ndim and mesh.size() == torch.distributed.get_world_size():
        return (None,)
    return tuple(mesh.get_group(d) for d in dims)


def local_parts(grads: list[Tensor], sharding: Sharding) -> list[Tensor]:
    """This rank's part of each gradient (a DTensor's local tensor, shared in place): what clipping scales."""
    if not sharding.dtensors:
        return grads
    with torch.no_grad():  # the local tensor itself, not an autograd view of it
        return [g.to_local() if isinstance(g, DTensor) else g for g in grads]


def norm_parts(grads: Sequence[Tensor], parts: list[Tensor], sharding: Sharding) -> list[Tensor]:
    """What each gradient's norm is taken of: its local part, with pending Partial sums reduced first."""
    if not sharding.partial:
        return parts
    out = list(parts)
    with torch.no_grad():
        for i in sharding.partial:
            g = grads[i]
            assert isinstance(g, DTensor)
            whole = [Replicate() if p.is_partial() else p for p in g.placements]
            out[i] = g.redistribute(g.device_mesh, whole).to_local()
    return out


def all_reduce_(sums: Tensor, groups: Iterable[ProcessGroup | None]) -> None:
    """Sum `sums` in place over every rank of the groups (asynchronous on the device: no host sync)."""
    for group in groups:
        torch.distributed.all_reduce(sums, group=group)


def refuse_sharded_rows(tensor: Tensor, heads: Sequence[str]) -> None:
    """Raise, naming the first head, if row-slice heads read a tensor (gradient or parameter) sharded by rows."""
    if not heads or not _dist_available or not isinstance(tensor, DTensor):
        return
    if any(p.is_shard(0) or p.is_shard(-tensor.dim()) for p in tensor.placements):
        raise ShardedSliceError(
            f"head {heads[0]!r} is a row slice of a parameter sharded by rows ({tensor.placements}): a rank's "
            "local rows are not the slice's. Keep that module unsharded (e.g. fully_shard only the trunk), "
            "shard it on another dimension, or measure the whole module as one head"
        )


class ShardedSliceError(ValueError):
    """A row-slice head over a gradient whose rows are split across ranks, where its norm cannot be taken."""


def refuse_legacy_fsdp(params: Iterable[nn.Parameter], policy: nn.Module | None = None) -> None:
    """Raise, saying what to use, if the policy is wrapped in legacy FSDP or its parameters were flattened by it."""
    if not _dist_available:
        return
    if policy is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in policy.modules()):
            raise LegacyFSDPError(LEGACY_FSDP_MESSAGE)
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        raise LegacyFSDPError(LEGACY_FSDP_MESSAGE)


class LegacyFSDPError(TypeError):
    """The policy is sharded by legacy FullyShardedDataParallel, whose per-rank norms would be false."""


LEGACY_FSDP_MESSAGE = (
    "tele-exporter does not measure legacy FullyShardedDataParallel: its flat parameter shards mix heads, so "
    "per-head and global norms would cover only this rank's shard. Shard with FSDP2 instead "
    "(torch.distributed.fsdp.fully_shard) or replicate with DistributedDataParallel; both are measured exactly."
)
