"""A background scraper for snippets that create their own server: it keeps the last /metrics it got.

    scraper = Scraper(namespace)     # the dict a snippet is exec'd in; it finds namespace["server"]
    scraper.start(); exec(code, namespace); scraper.stop()
    scraper.samples()                # {(name, sorted labels): value} of the last scrape

A snippet's `server.close()` with `linger` returns once this has scraped its final update.
"""

from __future__ import annotations

import contextlib
import threading
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """An exposition's samples as {(name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(url: str) -> Samples:
    """One GET of a /metrics URL, parsed."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        return parse(resp.read().decode())


class Scraper(threading.Thread):
    """Scrapes the server a snippet puts in its namespace every 50 ms while it runs, as Prometheus would."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.namespace = namespace
        self.last: str | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            server = self.namespace.get("server")
            if server is None or not server.running:
                continue
            with contextlib.suppress(OSError), urllib.request.urlopen(server.url, timeout=5) as resp:
                self.last = resp.read().decode()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def samples(self) -> Samples:
        """The last scrape's samples; AssertionError if there was none."""
        assert self.last is not None, "the snippet's server was never scraped"
        return parse(self.last)
