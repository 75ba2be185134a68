"""The scrape side: the metric collector, HTTP serving, the /api/snapshot document, web config, build info.

It reads a Telemetry only through the small `SnapshotSource` protocol (snapshot, errors,
catalog, const labels, registry) and never imports the telemetry layer or torch.
"""

from .http import DEFAULT_ADDR, DEFAULT_PORT, PortInUseError, Server, serve

__all__ = ["DEFAULT_ADDR", "DEFAULT_PORT", "PortInUseError", "Server", "serve"]
