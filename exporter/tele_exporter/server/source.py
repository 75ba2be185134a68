"""SnapshotSource: all the server layer reads from a Telemetry, as a Protocol.

Typing against it instead of Telemetry keeps server/ free of the telemetry layer and of torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry

from ..catalog.model import Catalog
from ..snapshot import Snapshot


class SnapshotSource(Protocol):
    """What the collector and the HTTP server read: the published snapshot, error counts and a few facts.

    Read-only properties, so a plain attribute (Telemetry's) or a frozen dataclass field satisfies each.
    """

    @property
    def catalog(self) -> Catalog:
        """The metrics exported: names, types, help, labels, levels."""
        ...

    @property
    def const_labels(self) -> Mapping[str, str]:
        """Labels added to every series, after each metric's own."""
        ...

    @property
    def registry(self) -> CollectorRegistry:
        """The registry /metrics renders."""
        ...

    @property
    def owns_registry(self) -> bool:
        """True when nothing but this source writes to `registry`, so /metrics may be cached per snapshot."""
        ...

    @property
    def enabled(self) -> bool:
        """False: serve() binds nothing."""
        ...

    def snapshot(self) -> Snapshot:
        """The latest published snapshot; the same object until the next publish."""
        ...

    def errors(self) -> dict[str, int]:
        """Exceptions caught so far, by site."""
        ...
