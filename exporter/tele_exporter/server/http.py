"""serve() and Server: bind the port, start the serving process on it, and stop it.

Ties the pieces together: the serving process (process.py, running child.py's event loop
over connections.py and routes.py), fed from one SnapshotSource (a Telemetry), with the web config.
"""

from __future__ import annotations

import errno
import logging
import math
import numbers
import socket
from pathlib import Path

from .api import snapshot_document
from .connections import DEFAULT_MAX_CONNECTIONS
from .process import ServingChild
from .routes import Scrapes
from .source import SnapshotSource
from .web_config import WebConfig, load_web_config

# DEFAULT_MAX_CONNECTIONS is serve()'s default; snapshot_document is imported from here by older callers.
__all__ = [
    "DEFAULT_ADDR",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_PORT",
    "PortInUseError",
    "Server",
    "serve",
    "snapshot_document",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 9842
DEFAULT_ADDR = "127.0.0.1"
LISTEN_BACKLOG = 1024


class PortInUseError(OSError):
    """The listen address is taken by another process."""


class Server:
    """A running exporter; `.url` is the /metrics URL, `.close()` stops it.

    A server for a disabled Telemetry is never started: `.running` is False,
    `.port` is 0, nothing listens, and close() returns at once.
    """

    def __init__(
        self,
        child: ServingChild | None,
        scheme: str = "http",
        *,
        addr: str = DEFAULT_ADDR,
        port: int = 0,
        tele: SnapshotSource | None = None,
        scrapes: Scrapes | None = None,
        linger: float = 0.0,
    ) -> None:
        self._child = child
        self._tele = tele
        self._scrapes = scrapes
        self.linger = _check_linger(linger)
        self.addr: str = addr
        self.port: int = port if child is not None else 0
        shown = f"[{self.addr}]" if ":" in self.addr else self.addr
        self.base_url = f"{scheme}://{shown}:{self.port}"
        self.url = f"{self.base_url}/metrics"

    @property
    def running(self) -> bool:
        """True while the server listens; always False for a disabled Telemetry's."""
        return self._child is not None and self._child.alive

    @property
    def pid(self) -> int | None:
        """The serving process's id while it runs, else None."""
        return self._child.pid if self._child is not None and self._child.alive else None

    def close(self, linger: float | None = None) -> bool:
        """Stop serving and release the port; safe to call twice.

        With `linger` seconds (default: serve's `linger`), first wait until a
        GET /metrics has been answered with the latest published update, so the
        final update reaches Prometheus. Returns False if the wait timed out, after
        logging one warning that names the wait and the publication left unscraped.
        """
        wait = self.linger if linger is None else _check_linger(linger)
        scraped = True
        if wait > 0 and self.running and self._tele is not None and self._scrapes is not None:
            latest = self._tele.snapshot().publications
            scraped = latest == 0 or self._scrapes.wait_for(latest, wait)
            if not scraped:
                log.warning(
                    "tele-exporter: waited %g s and no scrape of %s carried publication %d (the final update); "
                    "closing without it",
                    wait,
                    self.url,
                    latest,
                )
        if self._child is not None:
            self._child.stop()
        return scraped

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    tele: SnapshotSource,
    port: int = DEFAULT_PORT,
    addr: str = DEFAULT_ADDR,
    web_config: WebConfig | str | Path | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    linger: float = 0.0,
) -> Server:
    """Serve `tele` on http://addr:port/metrics from a separate serving process (port 0: any free port).

    `web_config` is an exporter-toolkit web config (a path or a loaded WebConfig)
    that adds TLS, basic auth, headers and a rate limit; the default binds loopback
    only, in plain HTTP. At most `max_connections` are open at once; beyond that the
    oldest connection that has not finished its request gives up its place.
    `linger` is how long close() waits for Prometheus to scrape the final update.
    A disabled Telemetry is not served: the Server returned binds nothing.
    """
    # Any integer type, numpy's too; a bool is no count.
    if isinstance(max_connections, bool) or not isinstance(max_connections, numbers.Integral) or max_connections < 1:
        raise ValueError(f"max_connections must be a whole number >= 1, got {max_connections!r}")
    max_connections = int(max_connections)
    _check_linger(linger)
    config = load_web_config(web_config) if isinstance(web_config, (str, Path)) else web_config
    scheme = "https" if config is not None and config.tls is not None else "http"
    if not tele.enabled:
        return Server(None, scheme, linger=linger, addr=addr)
    if config is not None and config.tls is not None:
        config.tls.context()  # a certificate that does not load fails here, in the caller, before any process starts
    listener = _listen(addr, port)
    scrapes = Scrapes()
    try:
        host, bound = listener.getsockname()[:2]
        child = ServingChild(listener, tele, scrapes, config, max_connections)
    finally:
        listener.close()  # the serving process holds its own copy
    return Server(child, scheme, addr=str(host), port=int(bound), tele=tele, scrapes=scrapes, linger=linger)


def _listen(addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(exc.errno, f"cannot listen on {addr}:{port}: address already in use") from None
        raise OSError(exc.errno, f"cannot listen on {addr}:{port}: {exc.strerror}") from None
    return sock


def _check_linger(linger: float) -> float:
    # Any real number type (numpy's too) but bool.
    if isinstance(linger, bool) or not isinstance(linger, numbers.Real) or not linger >= 0 or math.isinf(linger):
        raise ValueError(f"linger must be a finite number of seconds >= 0, got {linger!r}")
    return float(linger)
