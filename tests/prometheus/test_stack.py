"""`tele-exporter stack` starts a working Prometheus and Alertmanager, and explains missing binaries."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tele_exporter import cli, stack
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


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--prometheus-address", "9090", "'9090' is not HOST:PORT"),
        ("--prometheus-address", "localhost:http", "'localhost:http' is not HOST:PORT"),
        ("--alertmanager-address", "127.0.0.1:99999", "'127.0.0.1:99999' is not HOST:PORT (port 0-65535)"),
        ("--alertmanager-address", "127.0.0.1:0", "needs a fixed port"),
    ],
)
def test_a_bad_address_exits_2_naming_flag_and_value(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["stack", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and message in err, err


def test_ipv6_addresses_keep_their_brackets() -> None:
    args = argparse.ArgumentParser()
    stack.add_arguments(args)
    assert args.parse_args(["--prometheus-address", "[::1]:9090"]).prometheus_address == "[::1]:9090"


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
