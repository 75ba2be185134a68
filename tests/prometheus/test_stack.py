"""`tele-exporter stack` starts a working Prometheus and Alertmanager, and explains missing binaries."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tele_exporter import stack
from tests.support.servers import free_port, http_get, poll

ROOT = Path(__file__).resolve().parents[2]


def _args(**overrides: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    stack.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_missing_binaries_are_explained(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert stack.run(_args()) == 2
    err = capsys.readouterr().err
    assert "prometheus and alertmanager not found" in err and "apt-get install" in err


def test_config_dir_is_found_from_a_subdirectory() -> None:
    assert stack.find_config_dir(ROOT / "docs") == ROOT / "prometheus"


@pytest.mark.servers
def test_stack_serves_the_shipped_rules_until_interrupted() -> None:
    prom, am = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "tele_exporter.cli", "stack"]
    argv += ["--prometheus-address", prom, "--alertmanager-address", am]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        rules = poll(lambda: http_get(f"http://{prom}/api/v1/rules"), 60, what="stack's Prometheus")
        assert b"TeleKLDivergenceHigh" in rules and b"job:tele_ppo_updates:rate5m" in rules
        assert http_get(f"http://{am}/-/ready")
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out
    assert f"prometheus: http://{prom}" in out
