"""Failures inside telemetry, counted by site and logged once: training goes on, the value is missing."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("tele_exporter")


class ErrorCounter:
    """Thread-safe counts of caught exceptions per site; the first at each site is logged with its traceback."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def record(self, site: str, exc: BaseException) -> None:
        """Count a failure inside telemetry and log it the first time it happens at `site`."""
        with self._lock:
            self._counts[site] = self._counts.get(site, 0) + 1
            first = self._counts[site] == 1
        if first:
            log.warning("telemetry failed in %s; training goes on: %r", site, exc, exc_info=exc)

    def counts(self) -> dict[str, int]:
        """A copy of the counts by site."""
        with self._lock:
            return dict(self._counts)
