"""Ranks under torchrun (2 CPU ranks on gloo): each serves on base port + LOCAL_RANK with its rank label."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tele_exporter import Telemetry
from tele_exporter.distributed import file_sd_targets, local_rank, main, rank_port, serve_rank
from tele_exporter.server.http import PortInUseError

from .conftest import TinyPolicy

ROOT = Path(__file__).resolve().parents[1]


def test_rank_port_adds_local_rank() -> None:
    assert rank_port(9842, {}) == 9842
    assert rank_port(9842, {"LOCAL_RANK": "3"}) == 9845
    assert rank_port(0, {"LOCAL_RANK": "3"}) == 0
    assert local_rank({"LOCAL_RANK": ""}) == 0
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        local_rank({"LOCAL_RANK": "-1"})
    with pytest.raises(ValueError, match="outside"):
        rank_port(65535, {"LOCAL_RANK": "1"})


def test_file_sd_lists_every_rank_of_every_host(capsys: pytest.CaptureFixture[str]) -> None:
    groups = file_sd_targets(["h1", "h2"], 2, 9842, {"cluster": "a"})
    assert groups == [
        {"targets": ["h1:9842", "h1:9843"], "labels": {"node": "h1", "cluster": "a"}},
        {"targets": ["h2:9842", "h2:9843"], "labels": {"node": "h2", "cluster": "a"}},
    ]
    assert main(["file-sd", "--hosts", "h1,h2", "--nproc", "2", "--label", "cluster=a"]) == 0
    assert json.loads(capsys.readouterr().out)[1]["targets"] == ["h2:9842", "h2:9843"]
    with pytest.raises(ValueError, match="nproc"):
        file_sd_targets(["h1"], 0)


def test_file_sd_carries_the_job_label(capsys: pytest.CaptureFixture[str]) -> None:
    """--job sets the catalog's job_label, the label Telemetry's const_labels carry and the rank rules group by."""
    assert file_sd_targets(["h1"], 2, 9844, job="b") == [
        {"targets": ["h1:9844", "h1:9845"], "labels": {"node": "h1", "training_job": "b"}}
    ]
    assert main(["file-sd", "--hosts", "h1", "--nproc", "2", "--base-port", "9844", "--job", "b"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["labels"] == {"node": "h1", "training_job": "b"}
    with pytest.raises(ValueError, match="contradicts job 'b'"):
        file_sd_targets(["h1"], 2, 9844, {"training_job": "a"}, job="b")


def test_a_port_taken_by_another_job_names_it(policy: TinyPolicy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs whose port ranges overlap: the second fails at once, naming the port and the first job."""
    base = _free_pair()
    first = Telemetry(policy, heads={"op": policy.op}, const_labels={"training_job": "a"})
    monkeypatch.setenv("LOCAL_RANK", "0")
    with serve_rank(first, base + 1, "127.0.0.1"):
        second = Telemetry(policy, heads={"op": policy.op}, const_labels={"training_job": "b"})
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        with pytest.raises(PortInUseError) as caught:
            serve_rank(second, base, "127.0.0.1")
    message = str(caught.value)
    assert f"training job 'b': cannot serve on 127.0.0.1:{base + 1} (base port {base} + LOCAL_RANK 1)" in message
    assert "another tele-exporter (training_job='a')" in message
    assert f"({base}..{base + 1} for this one)" in message


def test_a_port_taken_by_something_else_says_so(policy: TinyPolicy, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = int(holder.getsockname()[1])
        monkeypatch.setenv("LOCAL_RANK", "0")
        tele = Telemetry(policy, heads={"op": policy.op})
        with pytest.raises(PortInUseError, match=f"this job: cannot serve on 127.0.0.1:{port} .* another process"):
            serve_rank(tele, port, "127.0.0.1")


def _free_pair() -> int:
    """A port p with p and p + 1 free (for two local ranks)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            body: str = resp.read().decode()
            return body
    except OSError:
        return None


@pytest.mark.slow
def test_torchrun_ranks_serve_with_rank_labels(tmp_path: Path) -> None:
    """The first launch fails; torchrun restarts both ranks, and each serves its rank and restart number."""
    base = _free_pair()
    stop = tmp_path / "stop"
    env = {
        **os.environ,
        "TELE_TEST_BASE_PORT": str(base),
        "TELE_TEST_STOP": str(stop),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_pair()),
        "-m", "tests.test_distributed",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    bodies: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 90
        while len(bodies) < 2 and time.monotonic() < deadline and proc.poll() is None:
            for r in (0, 1):
                body = _scrape(base + r)
                if body is not None and "tele_ppo_updates_total" in body and r not in bodies:
                    bodies[r] = body
            time.sleep(0.2)
    finally:
        stop.touch()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert sorted(bodies) == [0, 1], out
    for r, body in bodies.items():
        assert re.search(rf'^tele_ppo_updates_total\{{rank="{r}"\}} 1\.0$', body, re.M), body
        assert re.search(rf'^tele_head_grad_norm\{{head="op",kind="action",rank="{r}"\}} \d', body, re.M), body
        assert re.search(rf'^tele_kl_divergence\{{rank="{r}"\}} ', body, re.M), body
        assert re.search(rf'^tele_world_size\{{rank="{r}"\}} 2\.0$', body, re.M), body
        assert re.search(rf'^tele_torchrun_restarts\{{rank="{r}"\}} 1\.0$', body, re.M), body


def _doc_files() -> dict[str, str]:
    """The YAML blocks of docs/scale.md that follow a `<!-- file: NAME -->` marker."""
    text = (ROOT / "docs" / "scale.md").read_text()
    return dict(re.findall(r"<!-- file: (\S+) -->\n```yaml\n(.*?)```", text, re.S))


@pytest.mark.servers
def test_scale_doc_configs_pass_promtool(tmp_path: Path) -> None:
    files = _doc_files()
    assert set(files) == {"prometheus.yml", "federation.yml"}
    (tmp_path / "rules").mkdir()
    for generated in ("tele-recording.yml", "tele-alerts.yml", "tele-ranks.yml"):
        shutil.copy(ROOT / "prometheus" / "rules" / generated, tmp_path / "rules" / generated)
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "config", "federation.yml"],
    ):
        result = subprocess.run(["promtool", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"promtool {' '.join(args)}: {result.stdout}{result.stderr}"


def _worker() -> None:
    """One torchrun rank: a DDP-style all-reduce of gradients, one update, serve, wait for the test."""
    from .conftest import TinyPolicy, backward

    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        # Every rank fails before init_process_group: when only rank 1 failed, rank 0 was
        # stopped inside it, and the restarted rank 1 sometimes dialled its stale gloo address.
        raise SystemExit("the first launch fails, so that torchrun restarts the job")
    torch.distributed.init_process_group("gloo")
    try:
        rank = torch.distributed.get_rank()
        torch.manual_seed(0)
        policy = TinyPolicy()
        tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot})
        assert tele.const_labels == {"rank": str(rank)}
        with tele.update() as upd:
            backward(policy, scale=1.0 + rank, seed=rank)
            for p in policy.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
            upd.clip_grad_norm_(0.5)
            upd.observe_kl({"op": torch.full((4,), 0.01 * (rank + 1))})
        server = serve_rank(tele, int(os.environ["TELE_TEST_BASE_PORT"]), "127.0.0.1")
        assert server.port == int(os.environ["TELE_TEST_BASE_PORT"]) + local_rank()
        stop = Path(os.environ["TELE_TEST_STOP"])
        deadline = time.monotonic() + 90
        while not stop.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        server.close()
        tele.close()
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker()
