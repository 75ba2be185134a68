"""The house's layers: import-linter's contracts hold, and the spec side imports without torch or numpy."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter where importing torch, numpy or prometheus_client fails outright.
_BLOCK = (
    "import sys\n"
    "for name in ('torch', 'numpy', 'prometheus_client'):\n"
    "    sys.modules[name] = None  # an import of it now raises ImportError\n"
)


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK + code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_the_import_contracts_hold() -> None:
    """Layers along the data flow; measure without prometheus_client; catalog/generate without torch; server apart."""
    lint = shutil.which("lint-imports")
    assert lint, "lint-imports (import-linter, a test dependency) is not installed"
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    "module", ["tele_exporter", "tele_exporter.catalog", "tele_exporter.generate", "tele_exporter.snapshot"]
)
def test_the_spec_side_imports_without_torch_or_numpy(module: str) -> None:
    result = _python(f"import {module}\nprint('ok')")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_generate_check_runs_without_torch() -> None:
    """`tele-exporter generate --check` reads only the catalog: it passes with torch and numpy unimportable."""
    result = _python("from tele_exporter.cli import main\nsys.exit(main(['generate', '--check']))")
    assert result.returncode == 0, result.stderr


def test_the_package_is_lazy_but_its_public_names_work() -> None:
    import tele_exporter

    assert tele_exporter.__version__ == importlib.metadata.version("tele-exporter")
    assert {"Telemetry", "serve", "Snapshot", "Catalog"} <= set(dir(tele_exporter))
    from tele_exporter import Telemetry, serve

    assert Telemetry.__module__ == "tele_exporter.telemetry.telemetry" and callable(serve)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tele_exporter.nope  # noqa: B018
