"""tele-exporter: training-health telemetry for PyTorch RL, published for Prometheus."""

from .catalog import Catalog, CatalogError, default_catalog, load_catalog
from .server import PortInUseError, Server, serve
from .snapshot import Snapshot
from .telemetry import SeedWatch, Telemetry, Update
from .thresholds import ThresholdsError

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
    "default_catalog",
    "load_catalog",
    "serve",
]
__version__ = "0.1.0"
