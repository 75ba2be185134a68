"""Sharded training under real torchrun (gloo, CPU): true norms, torch's clip, no extra collective, every /metrics.

The ranks run tests/support/sharded_ranks.py (DDP, FSDP2, tensor parallel and
DTensor placements on 2 ranks; 2-D meshes and HSDP on 4) and write what they
measured; the assertions here compare it with the float64 single-process
reference each rank computed on the same data. Run alone with `pytest -m slow tests/measure/test_sharding.py`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tele_exporter import Telemetry
from tele_exporter.measure.sharding import (
    LEGACY_FSDP_MESSAGE,
    LOCAL,
    LegacyFSDPError,
    ShardedSliceError,
    Sharding,
    plan_sharding,
)

from ..conftest import TinyPolicy, backward

ROOT = Path(__file__).resolve().parents[2]
REL = 1e-6
MAX_NORM = 0.5
HEADS = ("op", "slot", "value")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(nproc: int, out: Path) -> list[dict[str, Any]]:
    """Launch the worker on `nproc` gloo ranks; every rank's results."""
    env = {
        **os.environ,
        "TELE_TEST_OUT": str(out),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "tests.support.sharded_ranks",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _torchrun(2, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _torchrun(4, tmp_path_factory.mktemp("four"))


def _published(body: str, rank: int, scenario: str) -> dict[str, float]:
    """Head and pre/post norms from one rank's /metrics text, checking its rank and scenario labels."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name not in ("tele_head_grad_norm", "tele_policy_grad_norm"):
                continue
            assert sample.labels["rank"] == str(rank) and sample.labels["scenario"] == scenario
            out[sample.labels.get("head") or sample.labels["clip"]] = sample.value
    return out


def _check(ranks: list[dict[str, Any]], scenario: str) -> None:
    for rank, results in enumerate(ranks):
        res = results[scenario]
        for step in res["steps"]:
            assert step["errors"] == {}, (rank, step["errors"])
            expected = step["expected"]
            total = expected["total"]
            clipped = total * min(1.0, MAX_NORM / (total + 1e-6))
            assert step["observed"] == pytest.approx(total, rel=REL)
            assert step["pre"] == pytest.approx(total, rel=REL)
            # the update observed the gradients, then clipped them: two steps, post is their mean
            published = _published(step["metrics"], rank, scenario)
            post = (total + clipped) / 2
            assert published == pytest.approx({**{h: expected[h] for h in HEADS}, "pre": total, "post": post}, rel=REL)
            assert step["clip_vs_torch"] < 1e-6, (rank, step["clip_vs_torch"])
            assert step["clip_vs_reference"] < 1e-5, (rank, step["clip_vs_reference"])
        counts = res["collectives"]
        assert all(t <= r for t, r in zip(counts["tele"], counts["torch"], strict=True)), (rank, counts)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["ddp", "fsdp2", "tp", "dtensor", "dtensor_partial"])
def test_two_ranks_match_the_single_process_reference(two_ranks: list[dict[str, Any]], scenario: str) -> None:
    _check(two_ranks, scenario)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["dtensor_2d", "hsdp"])
def test_two_d_meshes_match_the_single_process_reference(four_ranks: list[dict[str, Any]], scenario: str) -> None:
    _check(four_ranks, scenario)


@pytest.mark.slow
def test_a_head_held_wholly_by_other_ranks_is_measured_on_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    """Under FSDP2 the one-row value head lies on rank 0 alone; rank 1 publishes its full norm all the same."""
    assert two_ranks[0]["fsdp2"]["held"]["value"] == 17
    assert two_ranks[1]["fsdp2"]["held"]["value"] == 0
    for step in two_ranks[1]["fsdp2"]["steps"]:
        published = _published(step["metrics"], 1, "fsdp2")
        assert published["value"] == pytest.approx(step["expected"]["value"], rel=REL)


@pytest.mark.slow
def test_row_slice_heads_of_sharded_gradients_match_the_reference_on_every_rank(
    two_ranks: list[dict[str, Any]],
) -> None:
    """Rows whole on each rank (Shard(1), Replicate) are measured exactly; rows split by Shard(0) are refused."""
    for rank, results in enumerate(two_ranks):
        res = results["sliced"]
        assert res["errors"] == {}, (rank, res["errors"])
        heads = dict(res["expected"])
        total = heads.pop("total")
        assert res["pre"] == pytest.approx(total, rel=REL)
        post = total * min(1.0, MAX_NORM / (total + 1e-6))
        published = _published(res["metrics"], rank, "sliced")
        assert published == pytest.approx({**heads, "pre": total, "post": post}, rel=REL)
        assert 'head="value",kind="other"' in res["metrics"]
        assert res["refused"].startswith("head 'op_a' is a row slice of a parameter sharded by rows")


@pytest.mark.slow
def test_inf_and_nan_in_one_ranks_shard_reach_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    """NaN and Inf are data: an Inf (op) and a NaN (slot) held by rank 1 alone are published as such by both ranks."""
    for rank, results in enumerate(two_ranks):
        res = results["nonfinite"]
        assert res["errors"] == {} and res["total"] == "nan"
        published = _published(res["metrics"], rank, "nonfinite")
        assert published["op"] == math.inf and math.isnan(published["slot"]) and math.isfinite(published["value"])
        assert math.isnan(published["pre"])


@pytest.mark.slow
def test_sharded_steps_issue_no_more_collectives_than_torch(two_ranks: list[dict[str, Any]]) -> None:
    """One all-reduce replaces torch's for a sharded model; DDP's gradients need none."""
    counts = {name: res["collectives"] for name, res in two_ranks[0].items() if "collectives" in res}
    assert counts["ddp"] == {"torch": [0, 0], "tele": [0, 0]}
    for name in ("fsdp2", "tp", "dtensor"):
        assert counts[name]["tele"] == counts[name]["torch"] == [1, 1], (name, counts[name])
    # a Partial gradient is summed before its norm, as torch does, then the mesh's one reduction
    assert counts["dtensor_partial"]["tele"] == counts["dtensor_partial"]["torch"] == [2, 2]


@pytest.mark.slow
def test_two_d_meshes_issue_one_reduction(four_ranks: list[dict[str, Any]]) -> None:
    """On a whole-world 2 x 2 mesh one all-reduce covers both dimensions, where torch reduces each in turn."""
    counts = {name: res["collectives"] for name, res in four_ranks[0].items()}
    assert counts["dtensor_2d"] == {"torch": [2, 2], "tele": [1, 1]}
    assert counts["hsdp"] == {"torch": [1, 1], "tele": [1, 1]}


def _single_process_group(tmp_path: Path) -> None:
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)


def _reference(policy: TinyPolicy) -> dict[str, float]:
    """Float64 norms of the concatenated gradients of each head and of the whole policy."""
    heads = {"op": policy.op, "slot": policy.slot, "total": policy}
    grads = {
        name: [p.grad.to(torch.float64).flatten() for p in m.parameters() if p.grad is not None]
        for name, m in heads.items()
    }
    return {name: float(torch.cat(g).norm()) for name, g in grads.items()}


def test_plain_gradients_plan_no_reduction(policy: TinyPolicy) -> None:
    backward(policy)
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert plan_sharding(grads) == Sharding((LOCAL,) * len(grads), (), (), False)


def test_fully_shard_in_one_process_matches_torch(tmp_path: Path) -> None:
    """The DTensor path without torchrun: a one-rank FSDP2 mesh, one all-reduce in place of torch's."""
    from torch.distributed.fsdp import fully_shard

    _single_process_group(tmp_path)
    try:
        torch.manual_seed(0)
        policy = TinyPolicy()
        twin = copy.deepcopy(policy)
        fully_shard(policy)
        tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot})
        backward(policy, seed=2)  # type: ignore[arg-type]
        backward(twin, seed=2)
        expected = _reference(twin)
        torch_total = torch.nn.utils.clip_grad_norm_(twin.parameters(), MAX_NORM)
        with tele.update() as upd, torch.profiler.profile() as prof:
            pre = upd.clip_grad_norm_(MAX_NORM)
        assert sum(e.name.startswith("gloo:") for e in prof.events()) == 1
        assert float(pre) == pytest.approx(expected["total"], rel=REL)
        assert float(pre) == pytest.approx(float(torch_total), rel=REL)
        snap = tele.snapshot()
        assert {h: snap.head(h).current for h in ("op", "slot")} == pytest.approx(
            {h: expected[h] for h in ("op", "slot")}, rel=REL
        )
        for p, q in zip(policy.parameters(), twin.parameters(), strict=True):
            assert torch.allclose(p.grad.full_tensor(), q.grad, rtol=1e-6, atol=0)  # type: ignore[union-attr, arg-type]
        assert tele.errors() == {}
    finally:
        torch.distributed.destroy_process_group()


def test_a_row_slice_of_fully_sharded_rows_is_refused_naming_the_head(tmp_path: Path) -> None:
    """FSDP2 shards by rows (Shard(0)): a rank's rows are not the slice's; refused when Telemetry is built."""
    from torch.distributed.fsdp import fully_shard

    _single_process_group(tmp_path)
    try:
        policy = TinyPolicy()
        fully_shard(policy.op)
        with pytest.raises(ShardedSliceError, match=r"head 'fire' is a row slice of a parameter sharded by rows"):
            Telemetry(policy, heads={"slot": policy.slot, "fire": (policy.op, slice(3, 4))})
        Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}).close()  # the whole module is measured
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
@pytest.mark.parametrize("orig", [True, False])
def test_legacy_fsdp_is_refused_with_what_to_use(tmp_path: Path, orig: bool) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    _single_process_group(tmp_path)
    try:
        torch.manual_seed(0)
        policy = TinyPolicy()
        wrapped = FullyShardedDataParallel(policy, use_orig_params=orig, device_id=torch.device("cpu"))
        with pytest.raises(TypeError, match="fully_shard") as info:
            Telemetry(wrapped, heads={"op": policy.op})
        assert str(info.value) == LEGACY_FSDP_MESSAGE
        with pytest.raises(TypeError, match="legacy FullyShardedDataParallel"):
            Telemetry(policy, heads={"op": policy.op})  # its parameters were flattened
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_legacy_fsdp_wrapped_later_is_refused_at_the_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    _single_process_group(tmp_path)
    try:
        torch.manual_seed(0)
        policy = TinyPolicy()
        tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot})
        wrapped = FullyShardedDataParallel(policy, use_orig_params=True, device_id=torch.device("cpu"))
        with caplog.at_level(logging.WARNING, "tele_exporter"), tele.update() as upd:
            backward(wrapped.module, seed=1)  # type: ignore[arg-type]
            upd.observe_gradients()
            with pytest.raises(LegacyFSDPError, match="fully_shard"):
                upd.clip_grad_norm_(MAX_NORM)  # torch's clip would go by this rank's shard alone
        assert tele.errors() == {"observe_gradients": 1}
        assert LEGACY_FSDP_MESSAGE in caplog.text
        assert math.isnan(tele.snapshot().head("op").current)
    finally:
        torch.distributed.destroy_process_group()
