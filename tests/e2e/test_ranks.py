"""Rank health end to end: a real Prometheus (generated rules, file_sd) scrapes two real torchrun jobs.

Two jobs of 2 gloo ranks share one host, on port ranges that do not overlap, each
with its own `training_job` in const_labels and in file_sd. Job "a" trains its ranks
independently (a seed sweep under torchrun); job "b" all-reduces gradients every
update like DDP. Then:

* each rank publishes its own policy entropy and clip fraction (none is reduced, also
  under DDP), and the rank rules take the job's worst rank: the lowest entropy, the
  highest clip fraction;
* rank 1 of "a" enters a collective its peer never joins: its /metrics still
  answers (up 1), its updates stop, and TeleRankLagging goes pending for it alone;
* rank 1 of "b" is stopped (SIGSTOP): its scrapes time out (up 0), rank 0 of "b"
  blocks in its next all-reduce, and TeleRanksMissing goes pending for "b" alone;
* rank 1 of "a" is killed (SIGKILL): torchrun stops rank 0 too, `job:tele_ranks:count`
  of "a" stays a series at 0 and TeleTelemetryAbsent goes pending for both targets.

Run it alone with `python -m pytest tests/e2e/test_ranks.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tele_exporter import Telemetry
from tele_exporter.distributed import file_sd_targets, serve_rank
from tests.support.processes import stop_process
from tests.support.servers import Running, bindable, free_port, poll, start_prometheus

pytestmark = [pytest.mark.slow, pytest.mark.servers]

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
# Seconds a rank sleeps between updates: a few updates per scrape second.
UPDATE_PAUSE_S = 0.2
WORKER_DEADLINE_S = 300.0


@dataclass
class Job:
    """One torchrun job: its name, base port, torchrun process and the worker PIDs by rank."""

    name: str
    base: int
    torchrun: subprocess.Popen[str]
    pids: dict[int, int]

    def instance(self, rank: int) -> str:
        return f"127.0.0.1:{self.base + rank}"


def _free_range(count: int, taken: set[int]) -> int:
    """A base port whose `count` ports are free and outside `taken`."""
    for _ in range(100):
        base = free_port()
        ports = set(range(base, base + count))
        if base + count <= 65535 and not ports & taken and all(bindable(p) for p in ports):
            taken.update(ports)
            return base
    raise RuntimeError(f"no {count} adjacent free ports")


def _start_job(name: str, mode: str, base: int, control: Path) -> Job:
    env = {
        **os.environ,
        "TELE_TEST_JOB": name,
        "TELE_TEST_MODE": mode,
        "TELE_TEST_BASE_PORT": str(base),
        "TELE_TEST_CONTROL": str(control),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "0",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "tests.e2e.test_ranks",
    ]  # fmt: skip
    with (control / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return Job(name, base, proc, {})


def _prometheus_config(targets: Path) -> str:
    """The scrape job docs/scale.md shows: file_sd, honor_labels; 1s scrapes and evaluations."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": ["rules/*.yml"],
        "scrape_configs": [
            {
                "job_name": "tele",
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
            }
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


def _active(prom: Running, alertname: str, **labels: str) -> list[dict[str, Any]]:
    """Pending or firing alerts of that name whose labels include `labels`."""
    return [
        a
        for a in prom.alerts()
        if a["labels"].get("alertname") == alertname and all(a["labels"].get(k) == v for k, v in labels.items())
    ]


def _value(prom: Running, promql: str) -> dict[str, float]:
    """An instant query's values by training_job."""
    return {r["metric"].get("training_job", ""): float(r["value"][1]) for r in prom.query(promql)}


def _settles(prom: Running, record: str, expected: dict[str, float]) -> None:
    """A recording rule reaches `expected` (its latest evaluation may trail the scrapes by a cycle or two)."""
    try:
        poll(lambda: _value(prom, record) == expected, 30, interval=0.5, what=f"{record} == {expected}")
    except TimeoutError:
        assert _value(prom, record) == expected


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[tuple[Running, dict[str, Job]]]:
    taken: set[int] = set()
    ports = {"a": _free_range(2, taken), "b": _free_range(2, taken)}
    targets = tmp_path / "targets.json"
    groups = [g for name, base in ports.items() for g in file_sd_targets(["127.0.0.1"], 2, base, job=name)]
    targets.write_text(json.dumps(groups))
    started: dict[str, Job] = {}
    try:
        with start_prometheus(_prometheus_config(targets), RULE_FILES) as prom:
            started["a"] = _start_job("a", "independent", ports["a"], tmp_path)
            started["b"] = _start_job("b", "ddp", ports["b"], tmp_path)
            for job in started.values():
                for rank in (0, 1):
                    pid_file = tmp_path / f"{job.name}-{rank}.pid"
                    job.pids[rank] = poll(
                        lambda f=pid_file: int(f.read_text()), 120, what=f"rank {rank} of job {job.name} started"
                    )
            yield prom, started
    finally:
        for job in started.values():
            for pid in job.pids.values():
                _signal(pid, signal.SIGCONT)
            stop_process(job.torchrun)
        for job in started.values():
            for pid in job.pids.values():
                _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: signal.Signals) -> None:
    """Signal a worker this test started, if it still runs (a PID reused since is left alone)."""
    with contextlib.suppress(OSError):
        if b"tests.e2e.test_ranks" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, sig)


def test_killed_stopped_and_hung_ranks_raise_the_right_alerts(
    jobs: tuple[Running, dict[str, Job]], tmp_path: Path
) -> None:
    prom, started = jobs
    a, b = started["a"], started["b"]

    def all_publishing() -> bool:
        counts = {
            (r["metric"].get("training_job"), r["metric"].get("rank")): float(r["value"][1])
            for r in prom.query('tele_ppo_updates_total{job="tele"}')
        }
        return len(counts) == 4 and min(counts.values()) >= 3

    poll(all_publishing, 180, interval=0.5, what="4 ranks publishing")
    _settles(prom, "job:tele_ranks:count", {"a": 2.0, "b": 2.0})
    _settles(prom, "job:tele_world_size:max", {"a": 2.0, "b": 2.0})
    entropy = {
        (r["metric"]["training_job"], r["metric"]["rank"]): float(r["value"][1])
        for r in prom.query("tele_policy_entropy")
    }
    assert entropy == {("a", "0"): 0.5, ("a", "1"): 1.0, ("b", "0"): 0.5, ("b", "1"): 1.0}, (
        "measured per rank, never reduced"
    )
    _settles(prom, "job:tele_policy_entropy:min", {"a": 0.5, "b": 0.5})
    _settles(prom, "job:tele_ppo_clip_fraction:max", {"a": 0.2, "b": 0.2})
    restarts = prom.query('tele_torchrun_restarts{job="tele"}')
    assert sorted(float(r["value"][1]) for r in restarts) == [0.0] * 4
    assert {r["metric"]["instance"]: r["metric"]["rank"] for r in restarts} == {
        a.instance(0): "0",
        a.instance(1): "1",
        b.instance(0): "0",
        b.instance(1): "1",
    }
    assert not _active(prom, "TeleRankLagging") and not _active(prom, "TeleRanksMissing")

    (tmp_path / "a-hang-1").touch()
    os.kill(b.pids[1], signal.SIGSTOP)
    stopped_at = time.monotonic()

    def both_pending() -> bool:
        return bool(
            _active(prom, "TeleRankLagging", training_job="a", rank="1", instance=a.instance(1))
            and _active(prom, "TeleRanksMissing", training_job="b")
            and _active(prom, "TeleTelemetryAbsent", instance=b.instance(1))
        )

    poll(both_pending, 120, interval=0.5, what="TeleRankLagging for a/1 and TeleRanksMissing for b")
    print(f"\nhung and stopped ranks pending after {time.monotonic() - stopped_at:.1f}s")
    (lagging,) = _active(prom, "TeleRankLagging")
    assert float(lagging["value"]) > 3
    (missing,) = _active(prom, "TeleRanksMissing")
    assert missing["labels"]["training_job"] == "b" and float(missing["value"]) == 1.0
    _settles(prom, "job:tele_ranks:count", {"a": 2.0, "b": 1.0})
    assert [float(r["value"][1]) for r in prom.query(f'up{{instance="{a.instance(1)}"}}')] == [1.0]
    assert not _active(prom, "TeleTelemetryAbsent", training_job="a")

    os.kill(a.pids[1], signal.SIGKILL)
    killed_at = time.monotonic()

    def a_down() -> bool:
        absent = {x["labels"].get("instance") for x in _active(prom, "TeleTelemetryAbsent", training_job="a")}
        return absent == {a.instance(0), a.instance(1)} and _value(prom, "job:tele_ranks:count").get("a") == 0.0

    poll(a_down, 120, interval=0.5, what="job a down: both targets absent, its rank count 0")
    print(f"killed rank: job a counted 0 after {time.monotonic() - killed_at:.1f}s")
    assert a.torchrun.wait(timeout=60) != 0
    assert not _active(prom, "TeleRanksMissing", training_job="a")
    assert not _active(prom, "TeleRankLagging", training_job="b")


def _worker() -> None:
    """One torchrun rank: updates until the test kills it; enters a lone barrier when told to."""
    from tests.conftest import TinyPolicy, backward

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    job, mode = os.environ["TELE_TEST_JOB"], os.environ["TELE_TEST_MODE"]
    control = Path(os.environ["TELE_TEST_CONTROL"])
    torch.manual_seed(0)
    policy = TinyPolicy()
    tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, const_labels={"training_job": job})
    serve_rank(tele, int(os.environ["TELE_TEST_BASE_PORT"]), "127.0.0.1")
    (control / f"{job}-{rank}.pid").write_text(str(os.getpid()))
    deadline = time.monotonic() + WORKER_DEADLINE_S
    step = 0
    while time.monotonic() < deadline:
        if (control / f"{job}-hang-{rank}").exists():
            torch.distributed.barrier()  # a collective no other rank enters: hangs here
        with tele.update() as upd:
            backward(policy, seed=step * 2 + rank)
            if mode == "ddp":
                for p in policy.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
            upd.clip_grad_norm_(0.5)
            upd.observe_kl({"op": torch.full((4,), 0.01)})
            # Per-rank policy health, as each rank's own rollout gives it: rank 0 explores least, rank 1 clips most.
            upd.observe_entropy({"op": torch.full((4,), 0.5 * (rank + 1))})
            upd.observe_clip_fraction(0.1 * (rank + 1))
        step += 1
        time.sleep(UPDATE_PAUSE_S)


if __name__ == "__main__":
    _worker()
