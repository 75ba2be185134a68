"""Record on the device, fold once per update, publish a Snapshot: Telemetry, Update, SeedWatch."""

from .telemetry import SeedWatch, Telemetry, Update

__all__ = ["SeedWatch", "Telemetry", "Update"]
