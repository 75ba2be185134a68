"""`tele-exporter generate`: write the files derived from the catalog, or check them.

Each producer module in PRODUCERS exposes `files(catalog) -> dict[str, str]`
mapping a path relative to the repository root to its full content.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..catalog.model import Catalog

PRODUCERS = ("rules", "runbook", "dashboards", "grafana_alerts")


def render(catalog: Catalog) -> dict[str, str]:
    """Every generated file, by path relative to the repository root."""
    out: dict[str, str] = {}
    for name in PRODUCERS:
        module = importlib.import_module(f"{__name__}.{name}")
        for path, content in module.files(catalog).items():
            if path in out:
                raise ValueError(f"{path} is produced by two generators")
            out[path] = content
    return out


def write(root: Path, catalog: Catalog) -> list[str]:
    """Write every generated file under root; returns the paths that changed."""
    changed = []
    for rel, content in sorted(render(catalog).items()):
        path = root / rel
        if not path.exists() or path.read_text(encoding="utf-8") != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
            changed.append(rel)
    return changed


def stale(root: Path, catalog: Catalog) -> list[str]:
    """Paths whose committed content differs from what the catalog generates."""
    return [
        rel
        for rel, content in sorted(render(catalog).items())
        if not (root / rel).exists() or (root / rel).read_text(encoding="utf-8") != content
    ]
