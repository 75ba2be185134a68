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
    "flood.py": (["--rounds", "1", "--seconds", "0.5", "--rate", "20", "--workers", "1"], "ratio held/quiet"),
    "scrape_under_load.py": (["--rounds", "1", "--seconds", "0.5", "--rate", "20", "--seeds", "2"], "ratio scraped"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_and_prints_a_ratio(script: str) -> None:
    args, expected = CASES[script]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout, result.stdout
