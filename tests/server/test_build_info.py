"""build: tele_build_info's labels, and the git revision read from .git files without a git process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import tele_exporter
from tele_exporter import Telemetry
from tele_exporter.server.build_info import UNKNOWN, build_info, git_revision

from ..conftest import TinyPolicy

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_build_info_is_constant_1_with_version_revision_and_torch(policy: TinyPolicy) -> None:
    tele = Telemetry(policy, heads={"op": policy.op})
    text = generate_latest(tele.registry).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "tele_build_info"]
    (sample,) = family.samples
    assert sample.value == 1.0
    assert sample.labels == {
        "version": tele_exporter.__version__,
        "revision": build_info()[1],
        "torch": torch.__version__,
    }
    tele.close()


def test_the_revision_is_the_checked_out_commit() -> None:
    root = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    assert git_revision(root / "exporter" / "tele_exporter") == head.stdout.strip()


def test_revision_from_a_loose_ref_a_packed_ref_a_worktree_and_nothing(tmp_path: Path) -> None:
    git = tmp_path / "repo" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(SHA + "\n")
    assert git_revision(tmp_path / "repo" / "pkg") == SHA
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{SHA} refs/heads/main\n")
    assert git_revision(tmp_path / "repo") == SHA
    worktree = git / "worktrees" / "wt"
    worktree.mkdir(parents=True)
    (worktree / "HEAD").write_text("ref: refs/heads/main\n")
    (worktree / "commondir").write_text("../..\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {worktree}\n")
    assert git_revision(tmp_path / "wt") == SHA
    detached = tmp_path / "bare"
    (detached / ".git").mkdir(parents=True)
    (detached / ".git" / "HEAD").write_text(SHA + "\n")
    assert git_revision(detached) == SHA
    assert git_revision(Path("/")) == UNKNOWN
