"""Smoke test of the benchmark scripts with tiny sizes: they run and print their ratios (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "update_overhead.py": (["--updates", "1", "--envs", "2", "--steps", "4"], "whole-update ratio"),
    "scrape_render.py": (["--seeds", "4,16", "--repeat", "2"], "ratio"),
    "seed_overhead.py": (["--updates", "1", "--steps", "2", "--width", "32", "--batch", "8"], "seed watch ratio"),
    "disabled_overhead.py": (["--rounds", "1", "--minibatches", "2", "--epochs", "1"], "ratio disabled/plain"),
    "flood.py": (
        ["--rounds", "1", "--seconds", "0.5", "--rate", "20", "--workers", "1", "--slow", "20"],
        "ratio held/quiet",
    ),
    "scrape_under_load.py": (["--rounds", "1", "--seconds", "0.5", "--rate", "20", "--seeds", "2"], "ratio scraped"),
    "torchrl_kl.py": (["--rounds", "1", "--minibatches", "2", "--epochs", "1"], "extra_pass/plain"),
    "rllib_overhead.py": (
        ["--rounds", "1", "--warmup", "0", "--batch", "128", "--minibatch", "64", "--epochs", "1"],
        "ratio instrumented/plain",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_and_prints_a_ratio(script: str) -> None:
    args, expected = CASES[script]
    if script == "rllib_overhead.py":
        pytest.importorskip("ray.rllib", reason="Ray RLlib is not installed (pip install -e '.[rllib]')")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    if script == "rllib_overhead.py" and "Ray cannot start here" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout, result.stdout


@pytest.mark.slow
@pytest.mark.servers
def test_healthy_soak_runs_against_a_real_prometheus_and_reports_alerts() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "healthy_soak.py"), "--minutes", "0.25", "--poll", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("soak: max CV: ") for line in lines), lines
    assert "soak: alerts that fired: none" in lines, lines
