"""Security: the shipped examples are valid, the default bind is loopback, no secrets are tracked."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tele_exporter import Telemetry, serve
from tele_exporter.server.http import DEFAULT_ADDR
from tele_exporter.server.web_config import load_web_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples" / "security"


def test_default_bind_is_loopback(tele: Telemetry) -> None:
    assert DEFAULT_ADDR == "127.0.0.1"
    server = serve(tele, port=0)
    try:
        assert server.addr == "127.0.0.1"
    finally:
        server.close()


@pytest.mark.servers
def test_prometheus_scrape_example_passes_promtool(tmp_path: Path) -> None:
    assert shutil.which("promtool"), "promtool is missing: install Debian's prometheus package"
    config = tmp_path / "prometheus.yml"
    shutil.copy(EXAMPLES / "prometheus-scrape-tls.yml", config)
    (tmp_path / "tele-ca.crt").write_text("placeholder: promtool checks that the file exists\n")
    (tmp_path / "tele-password").write_text("placeholder\n")
    result = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_web_config_example_parses_but_needs_real_certificates(tmp_path: Path) -> None:
    example = tmp_path / "web-config.yml"
    shutil.copy(EXAMPLES / "web-config.yml", example)
    with pytest.raises(ValueError, match="cannot load certificate"):
        load_web_config(example)  # the example names files the user makes; it carries none


def test_no_private_keys_or_plain_passwords_are_tracked() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in {".png", ".whl"}:
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        if re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text):
            offenders.append(f"{name}: private key")
        if name.startswith("tests/"):
            continue  # tests make throwaway credentials on purpose
        for match in re.finditer(r"(?im)^\s*(?:admin_)?password\s*[:=]\s*(\S+)", text):
            if not match.group(1).startswith(("$", "${", "<")):
                offenders.append(f"{name}: {match.group(0).strip()}")
    assert offenders == []
