"""tele-exporter: training-health telemetry for PyTorch RL, published for Prometheus.

The package is lazy (PEP 562): `import tele_exporter.catalog` or `tele_exporter.generate`
loads neither torch nor numpy; `from tele_exporter import Telemetry` loads the training
side on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .catalog import Catalog, CatalogError, ThresholdsError, default_catalog, load_catalog
    from .server import PortInUseError, Server, serve
    from .snapshot import Snapshot
    from .telemetry import SeedWatch, Telemetry, Update

# public name -> the module that defines it
_EXPORTS = {
    "Catalog": "tele_exporter.catalog",
    "CatalogError": "tele_exporter.catalog",
    "ThresholdsError": "tele_exporter.catalog",
    "default_catalog": "tele_exporter.catalog",
    "load_catalog": "tele_exporter.catalog",
    "PortInUseError": "tele_exporter.server",
    "Server": "tele_exporter.server",
    "serve": "tele_exporter.server",
    "Snapshot": "tele_exporter.snapshot",
    "SeedWatch": "tele_exporter.telemetry",
    "Telemetry": "tele_exporter.telemetry",
    "Update": "tele_exporter.telemetry",
}

__all__ = [
    "Catalog",
    "CatalogError",
    "PortInUseError",
    "SeedWatch",
    "Server",
    "Snapshot",
    "Telemetry",
    "ThresholdsError",
    "Update",
    "__version__",
    "default_catalog",
    "load_catalog",
    "serve",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tele_exporter' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
