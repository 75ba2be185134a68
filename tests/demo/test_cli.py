"""`tele-exporter demo` as a user runs it: flags, URL line, progress lines, Ctrl-C, taken ports."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tele_exporter.demo import FaultPlan
from tele_exporter.demo.__main__ import main as demo_main
from tele_exporter.demo.cli import add_arguments, updates_wanted

URL_LINE = re.compile(r"live page at (http://127\.0\.0\.1:(\d+)/) and metrics at (http://127\.0\.0\.1:(\d+)/metrics)$")
SUMMARY = re.compile(
    r"^tele-exporter demo: (\d+) updates in \d+\.\d s; mean reward of the last (\d+) [+-]\d+\.\d+;"
    r" healthy updates: kl (\d+)/(\d+), grad (\d+)/(\d+), cv (\d+)/(\d+)$"
)
PROGRESS = re.compile(
    r"^update (\d+)/(\d+|inf)  reward [+-]\d+\.\d+  kl \S+ \((healthy|warning|critical)\)"
    r"  grad \S+ \((vanishing|healthy|warning|critical)\)  cv \S+ \((healthy|warning|critical)\)"
)


def demo_command() -> list[str]:
    """`tele-exporter demo`, through the package's own entry point."""
    return [sys.executable, "-m", "tele_exporter.cli", "demo"]


def start(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*demo_command(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).parent,
    )


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_and_fault_window_flags() -> None:
    args = parse()
    assert args.listen == ("127.0.0.1", 9842)
    assert (updates_wanted(args), args.envs, args.fault, args.fault_until) == (50, 8, "none", None)
    args = parse("--fault", "kl", "--fault-after", "2", "--fault-until", "4", "--web.listen-address", "[::1]:0")
    assert args.listen == ("::1", 0)
    plan = FaultPlan(args.fault, args.fault_after, args.fault_until)
    assert [plan.active(k) for k in range(1, 7)] == [False, False, True, True, False, False]


def test_a_fault_run_trains_until_ctrl_c_unless_told_otherwise() -> None:
    assert updates_wanted(parse("--fault", "kl")) == 0
    assert updates_wanted(parse("--fault", "kl", "--updates", "7")) == 7
    assert updates_wanted(parse("--updates", "0")) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fault", "kl", "--fault-after", "5", "--fault-until", "2"], "--fault-until 2 must be greater than"),
        (["--fault", "kl", "--fault-after", "3", "--fault-until", "3"], "--fault-until 3 must be greater than"),
        (["--fault-until", "4"], "--fault-until is given without --fault"),
    ],
)
def test_a_fault_window_that_never_opens_is_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo_main([*argv, "--web.listen-address", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tele-exporter demo: ") and message in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["--updates", "-1"],
        ["--updates", "many"],
        ["--envs", "0"],
        ["--fault", "bogus"],
        ["--fault-after", "-3"],
        ["--web.listen-address", "nope"],
        ["--web.listen-address", "127.0.0.1:99999"],
        ["--target-kl", "0"],
        ["--max-grad-norm", "nan"],
        ["--device", "tpu"],
        ["--no-such-flag"],
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        demo_main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_top_level_cli_wires_the_demo() -> None:
    cli = importlib.import_module("tele_exporter.cli")
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--envs", "0"])
    assert exc.value.code == 2


def test_prints_both_urls_first_then_one_line_per_update_then_a_summary() -> None:
    proc = start("--updates", "2", "--envs", "2", "--web.listen-address", "127.0.0.1:0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    match = URL_LINE.search(lines[0])
    assert match and int(match.group(2)) > 0 and match.group(2) == match.group(4), lines[0]
    progress = [PROGRESS.match(line) for line in lines[1:3]]
    assert all(progress), lines
    assert [(m.group(1), m.group(2)) for m in progress if m] == [("1", "2"), ("2", "2")]
    assert len(lines) == 4, lines
    summary = SUMMARY.match(lines[3])
    assert summary, lines[3]
    assert (summary.group(1), summary.group(2), summary.group(4), summary.group(6)) == ("2", "2", "2", "2")
    for healthy in (summary.group(3), summary.group(5), summary.group(7)):
        assert 0 <= int(healthy) <= 2


def test_ctrl_c_stops_cleanly_and_closes_the_server() -> None:
    proc = start("--updates", "0", "--envs", "2", "--web.listen-address", "127.0.0.1:0")
    try:
        assert proc.stdout is not None
        match = URL_LINE.search(proc.stdout.readline().strip())
        assert match, "the URL comes first"
        with urllib.request.urlopen(match.group(1), timeout=10) as resp:
            assert b"<html" in resp.read().lower()
        url = match.group(3)
        first = proc.stdout.readline()
        assert PROGRESS.match(first) and "/inf" in first
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert b"tele_ppo_updates_total" in resp.read()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_a_taken_port_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start("--updates", "1", "--envs", "1", "--web.listen-address", f"127.0.0.1:{port}")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode not in (0, None)
    assert out == ""
    assert err.strip().count("\n") == 0 and f"127.0.0.1:{port}" in err, err


def test_a_malformed_web_config_file_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "web.yml"
    bad.write_text("basic_auth_users:\n  bob: hunter2\n")
    with pytest.raises(SystemExit) as exc:
        demo_main(["--web.config.file", str(bad)])
    assert exc.value.code == 2
    assert "basic_auth_users.bob: expected a bcrypt hash" in capsys.readouterr().err


def test_the_sample_output_in_docs_matches_a_real_run() -> None:
    """docs/demo.md's console block: its first lines are what `tele-exporter demo` prints, to the digit."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "demo.md").read_text(encoding="utf-8")
    block = re.search(r"```console\n\$ tele-exporter demo\n(.*?)```", text, re.S)
    assert block, "docs/demo.md starts with a console block of `tele-exporter demo`"
    shown = [line for line in block.group(1).splitlines() if line != "..."]
    assert URL_LINE.search(shown[0]) and all(PROGRESS.match(line) for line in shown[1:-1]), shown
    assert SUMMARY.match(shown[-1]), shown[-1]
    first = [line for line in shown[1:-1] if line.startswith(("update 1/", "update 2/", "update 3/"))]
    assert len(first) == 3, shown
    proc = start("--web.listen-address", "127.0.0.1:0")
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().rstrip("\n") for _ in range(4)]
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    port = URL_LINE.search(lines[0])
    assert port, lines[0]
    assert lines[0].replace(f":{port.group(2)}/", ":9842/") == shown[0]
    assert lines[1:] == first
