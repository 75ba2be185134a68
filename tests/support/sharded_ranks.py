"""One torchrun rank of tests/measure/test_sharding.py: sharded scenarios against a single-process float64 reference.

Every scenario trains a TinyPolicy-shaped model for a few updates of one clipped
step each, sharded the scenario's way, next to an unsharded twin that sees the
same data in one process. Per step it records torch's and telemetry's clipped
gradients, both profiled for collectives, the reference norms, and this rank's
/metrics as served over HTTP. The JSON goes to $TELE_TEST_OUT/rank<r>.json for
the pytest side to judge: nothing is asserted here.
"""

from __future__ import annotations

import copy
import json
import math
import os
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, profile

from tele_exporter import Telemetry
from tele_exporter.measure.sharding import ShardedSliceError
from tele_exporter.server.http import serve

from ..conftest import TinyPolicy

HEADS = ("op", "slot", "value")
MAX_NORM = 0.5
UPDATES = 2
LR = 0.1


def loss_of(policy: nn.Module, seed: int) -> Tensor:
    """A loss over a batch drawn from `seed`, with heads of clearly different gradient norms."""
    gen = torch.Generator().manual_seed(seed)
    op, slot, value = policy(torch.randn(8, 6, generator=gen))
    return op.pow(2).mean() + 3.0 * slot.pow(2).mean() + 0.5 * value.pow(2).mean()


def reference_norms(policy: TinyPolicy) -> dict[str, float]:
    """Per-head and total L2 norms of the unsharded gradients, in float64 over the concatenated elements."""

    def norm(params: Iterator[nn.Parameter]) -> float:
        grads = [p.grad.detach().to(torch.float64).flatten() for p in params if p.grad is not None]
        return float(torch.cat(grads).norm())

    out = {h: norm(getattr(policy, h).parameters()) for h in HEADS}
    out["total"] = norm(policy.parameters())
    return out


def full(t: Tensor) -> Tensor:
    """The whole tensor on every rank, whether plain or a DTensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@contextmanager
def collectives(out: list[int]) -> Iterator[None]:
    """Count the collectives run inside the block: the gloo backend's own profiler events."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    out.append(sum(1 for e in prof.events() if e.name.startswith("gloo:")))


def torch_clip(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """torch's clip_grad_norm_; with DTensor and plain gradients mixed (which it refuses), torch's own two halves."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded or len(sharded) == len(grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [g for g in grads if not isinstance(g, DTensor)]
    parts = [full(torch.nn.utils.get_total_norm(sharded)), torch.nn.utils.get_total_norm(plain)]
    total = torch.linalg.vector_norm(torch.stack(parts))
    torch.nn.utils.clip_grads_with_norm_([p for p in params if isinstance(p.grad, DTensor)], max_norm, total)
    torch.nn.utils.clip_grads_with_norm_([p for p in params if not isinstance(p.grad, DTensor)], max_norm, total)
    return total


def scrape(tele: Telemetry) -> str:
    server = serve(tele, 0, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as resp:
            body: str = resp.read().decode()
            return body
    finally:
        server.close()


Backward = Callable[[nn.Module, int], None]


Seeds = Callable[[int], list[int]]


def run(name: str, model: nn.Module, policy: nn.Module, backward: Backward, seeds: Seeds) -> dict[str, Any]:
    """Train `model` (whose inner TinyPolicy is `policy`) next to an unsharded reference; record every step."""
    torch.manual_seed(0)
    ref = TinyPolicy()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR, foreach=False)
    opt = torch.optim.SGD(model.parameters(), lr=LR, foreach=False)
    tele = Telemetry(policy, heads={h: getattr(policy, h) for h in HEADS}, const_labels={"scenario": name})
    params = list(policy.parameters())
    steps: list[dict[str, Any]] = []
    counts: dict[str, list[int]] = {"torch": [], "tele": []}
    for update in range(UPDATES):
        step_seeds = seeds(update)
        ref.zero_grad(set_to_none=True)
        (sum(loss_of(ref, s) for s in step_seeds) / len(step_seeds)).backward()
        expected = reference_norms(ref)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)

        model.zero_grad(set_to_none=True)
        backward(model, update)
        saved = [local(p.grad).clone() if p.grad is not None else None for p in params]
        with collectives(counts["torch"]):
            torch_total = torch_clip(params, MAX_NORM)
        torch_clipped = [local(p.grad).clone() if p.grad is not None else None for p in params]
        for p, s in zip(params, saved, strict=True):
            if p.grad is not None and s is not None:
                local(p.grad).copy_(s)
        with tele.update() as upd:
            observed = upd.observe_gradients()
            with collectives(counts["tele"]):
                pre = upd.clip_grad_norm_(MAX_NORM)
        vs_torch = max(
            float((local(p.grad) - t).abs().max() / t.abs().max())
            for p, t in zip(params, torch_clipped, strict=True)
            if p.grad is not None and t is not None and t.numel()
        )
        vs_ref = max(
            float((full(p.grad).detach() - r.grad).abs().max() / r.grad.abs().max())
            for p, r in zip(params, ref.parameters(), strict=True)
            if r.grad is not None and p.grad is not None
        )
        steps.append(
            {
                "expected": expected,
                "observed": float(observed),
                "pre": float(pre),
                "torch_pre": float(full(torch_total)),
                "clip_vs_torch": vs_torch,
                "clip_vs_reference": vs_ref,
                "metrics": scrape(tele),
                "errors": tele.errors(),
            }
        )
        opt.step()
        ref_opt.step()
    tele.close()
    held = {h: sum(local(p).numel() for p in getattr(policy, h).parameters()) for h in HEADS}
    return {"steps": steps, "collectives": counts, "held": held}


def data_parallel_seeds(update: int) -> list[int]:
    return [100 * update + r for r in range(dist.get_world_size())]


def same_data_seeds(update: int) -> list[int]:
    return [100 * update]


def rank_backward(model: nn.Module, update: int) -> None:
    """Data parallel: every rank its own batch; the wrapper averages the gradients."""
    loss_of(model, 100 * update + dist.get_rank()).backward()


def shared_backward(model: nn.Module, update: int) -> None:
    """Tensor parallel: every rank the same batch."""
    loss_of(model, 100 * update).backward()


def ddp() -> dict[str, Any]:
    torch.manual_seed(0)
    policy = TinyPolicy()
    return run("ddp", DistributedDataParallel(policy), policy, rank_backward, data_parallel_seeds)


def fsdp2(mesh: DeviceMesh) -> dict[str, Any]:
    """fully_shard per layer and at the root; the value head (one row) lies wholly on the first rank."""
    torch.manual_seed(0)
    policy = TinyPolicy()
    for module in (policy.trunk, policy.op, policy.slot, policy.value):
        fully_shard(module, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    return run("fsdp2", policy, policy, rank_backward, data_parallel_seeds)


def fsdp2_nonfinite(mesh: DeviceMesh) -> dict[str, Any]:
    """One FSDP2 step where only the last rank's shards hold an Inf (op) and a NaN (slot): every rank must see them."""
    torch.manual_seed(0)
    policy = TinyPolicy()
    for module in (policy.trunk, policy.op, policy.slot, policy.value):
        fully_shard(module, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    tele = Telemetry(policy, heads={h: getattr(policy, h) for h in HEADS}, const_labels={"scenario": "nonfinite"})
    rank_backward(policy, 0)
    if dist.get_rank() == dist.get_world_size() - 1:
        local(policy.op.weight.grad)[0, 0] = math.inf  # type: ignore[index]
        local(policy.slot.weight.grad)[0, 0] = math.nan  # type: ignore[index]
    with tele.update() as upd:
        total = upd.observe_gradients()
    body = scrape(tele)
    tele.close()
    return {"total": repr(float(total)), "metrics": body, "errors": tele.errors()}


def tensor_parallel(mesh: DeviceMesh) -> dict[str, Any]:
    """Column-parallel action heads (DTensor), a plain trunk and value head (replicated Tensors)."""
    torch.manual_seed(0)
    policy = TinyPolicy()
    plan = {"op": ColwiseParallel(output_layouts=Replicate()), "slot": ColwiseParallel(output_layouts=Replicate())}
    parallelize_module(policy, mesh, plan)  # type: ignore[arg-type]
    return run("tp", policy, policy, shared_backward, same_data_seeds)


def distribute(policy: TinyPolicy, mesh: DeviceMesh, placements: dict[str, list[Placement]]) -> None:
    """Replace the named parameters ("module.attr") by DTensors of these placements."""
    for pname, places in placements.items():
        module_name, attr = pname.split(".")
        module = getattr(policy, module_name)
        setattr(module, attr, nn.Parameter(distribute_tensor(getattr(module, attr).detach(), mesh, places)))


def row_norm(params: list[Tensor], start: int, stop: int) -> float:
    """Float64 norm of rows [start, stop) of each gradient, concatenated."""
    return float(torch.cat([p.grad.detach()[start:stop].double().flatten() for p in params]).norm())  # type: ignore[union-attr]


def sliced(mesh: DeviceMesh) -> dict[str, Any]:
    """Row-slice heads of op over gradients whose rows are whole on every rank (Shard(1), Replicate), a value group.

    Also what Telemetry says to a row slice of a parameter sharded by rows (Shard(0)).
    """
    torch.manual_seed(0)
    policy = TinyPolicy()
    twin = copy.deepcopy(policy)
    placements = {"trunk.weight": [Shard(0)], "op.weight": [Shard(1)], "op.bias": [Replicate()]}
    distribute(policy, mesh, placements)
    heads = {"op_a": (policy.op, slice(0, 3)), "op_b": (policy.op, slice(3, 4)), "slot": policy.slot}
    tele = Telemetry(policy, heads=heads, groups={"value": policy.value}, const_labels={"scenario": "sliced"})
    loss_of(twin, 7).backward()
    for (pname, p), q in zip(policy.named_parameters(), twin.parameters(), strict=True):
        assert q.grad is not None
        p.grad = distribute_tensor(q.grad, mesh, placements[pname]) if pname in placements else q.grad.clone()
    op = list(twin.op.parameters())
    expected = {
        "op_a": row_norm(op, 0, 3),
        "op_b": row_norm(op, 3, 4),
        "slot": row_norm(list(twin.slot.parameters()), 0, 3),
        "value": row_norm(list(twin.value.parameters()), 0, 1),
        "total": float(torch.cat([q.grad.double().flatten() for q in twin.parameters()]).norm()),  # type: ignore[union-attr]
    }
    with tele.update() as upd:
        pre = upd.clip_grad_norm_(MAX_NORM)
    body = scrape(tele)
    tele.close()
    refused = ""
    rows_sharded = TinyPolicy()
    distribute(rows_sharded, mesh, {"op.weight": [Shard(0)]})
    try:
        Telemetry(rows_sharded, heads={"op_a": (rows_sharded.op, slice(0, 3))})
    except ShardedSliceError as exc:
        refused = str(exc)
    return {"expected": expected, "pre": float(pre), "metrics": body, "errors": tele.errors(), "refused": refused}


def placed(
    mesh: DeviceMesh, placements: dict[str, list[Placement]], name: str, partial: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Parameters and gradients as DTensors of these placements; gradients from a plain twin's backward.

    A parameter named in `partial` is replicated, and its gradient holds pending sums (Partial), as under TP.
    """
    torch.manual_seed(0)
    policy = TinyPolicy()
    twin = copy.deepcopy(policy)
    distribute(policy, mesh, placements)

    def backward(model: nn.Module, update: int) -> None:
        twin.load_state_dict({k: full(v.detach()) for k, v in model.state_dict().items()})
        twin.zero_grad(set_to_none=True)
        loss_of(twin, 100 * update).backward()
        for (pname, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert q.grad is not None
            if pname in partial:
                share = q.grad * (dist.get_rank() + 1) / sum(range(1, mesh.size() + 1))  # unequal summands
                p.grad = DTensor.from_local(share, mesh, [Partial()] * mesh.ndim, run_check=False)
            elif isinstance(p, DTensor):
                p.grad = distribute_tensor(q.grad, mesh, placements[pname])
            else:
                p.grad = q.grad.clone()

    return run(name, policy, policy, backward, same_data_seeds)


def dtensor_1d(mesh: DeviceMesh) -> dict[str, Any]:
    """Shard(0), Shard(1) and Replicate on one mesh, plain tensors beside them; value.weight lies on the first rank."""
    s0, s1, rep = [Shard(0)], [Shard(1)], [Replicate()]
    placements = {"trunk.weight": s1, "trunk.bias": rep, "op.weight": s0, "op.bias": s0, "value.weight": s0}
    return placed(mesh, placements, "dtensor")


def dtensor_partial(mesh: DeviceMesh) -> dict[str, Any]:
    """Shard(0) parameters beside a replicated one whose gradient is still a Partial sum."""
    s0, rep = [Shard(0)], [Replicate()]
    placements = {"trunk.weight": s0, "op.weight": s0, "slot.bias": rep}
    return placed(mesh, placements, "dtensor_partial", partial=("slot.bias",))


def dtensor_2d(mesh: DeviceMesh) -> dict[str, Any]:
    """Every pairing of Shard and Replicate on a 2 x 2 mesh."""
    s0, s1, rep = Shard(0), Shard(1), Replicate()
    placements = {
        "trunk.weight": [s0, s1],
        "trunk.bias": [rep, s0],
        "op.weight": [s0, rep],
        "op.bias": [rep, rep],
        "slot.weight": [rep, s1],
        "slot.bias": [s0, s0],
        "value.weight": [s1, s0],
    }
    return placed(mesh, placements, "dtensor_2d")


def hsdp(mesh: DeviceMesh) -> dict[str, Any]:
    """fully_shard on a 2 x 2 mesh: replicated across dim 0, sharded across dim 1 (HSDP)."""
    torch.manual_seed(0)
    policy = TinyPolicy()
    for module in (policy.trunk, policy.op, policy.slot, policy.value):
        fully_shard(module, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    return run("hsdp", policy, policy, rank_backward, data_parallel_seeds)


def main() -> None:
    dist.init_process_group("gloo")
    try:
        world = dist.get_world_size()
        results: dict[str, Any] = {}
        if world == 2:
            mesh = init_device_mesh("cpu", (2,))
            results["ddp"] = ddp()
            results["fsdp2"] = fsdp2(mesh)
            results["nonfinite"] = fsdp2_nonfinite(mesh)
            results["tp"] = tensor_parallel(mesh)
            results["dtensor"] = dtensor_1d(mesh)
            results["dtensor_partial"] = dtensor_partial(mesh)
            results["sliced"] = sliced(mesh)
        else:
            mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
            results["dtensor_2d"] = dtensor_2d(mesh2)
            results["hsdp"] = hsdp(mesh2)
        out = Path(os.environ["TELE_TEST_OUT"]) / f"rank{dist.get_rank()}.json"
        out.write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
