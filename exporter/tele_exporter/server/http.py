"""serve() and Server: start the exporter on a port from a daemon thread, and stop it.

Ties the pieces together: the bounded connections (connections.py), the WSGI app
(routes.py) and the web config (web_config.py), for one SnapshotSource (a Telemetry).
"""

from __future__ import annotations

import errno
import math
import socket
import threading
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from .api import snapshot_document
from .connections import DEFAULT_MAX_CONNECTIONS, BoundedServer, QuietHandler
from .routes import Scrapes, make_app
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

DEFAULT_PORT = 9842
DEFAULT_ADDR = "127.0.0.1"


class PortInUseError(OSError):
    """The listen address is taken by another process."""


class Server:
    """A running exporter; `.url` is the /metrics URL, `.close()` stops it.

    A server for a disabled Telemetry is never started: `.running` is False,
    `.port` is 0, nothing listens, and close() returns at once.
    """

    def __init__(
        self,
        httpd: WSGIServer | None,
        thread: threading.Thread | None,
        scheme: str = "http",
        *,
        tele: SnapshotSource | None = None,
        scrapes: Scrapes | None = None,
        linger: float = 0.0,
        addr: str = DEFAULT_ADDR,
    ) -> None:
        self._httpd = httpd
        self._thread = thread
        self._tele = tele
        self._scrapes = scrapes
        self.linger = _check_linger(linger)
        host, port = httpd.server_address[:2] if httpd is not None else (addr, 0)
        self.addr: str = str(host)
        self.port: int = int(port)
        shown = f"[{self.addr}]" if ":" in self.addr else self.addr
        self.base_url = f"{scheme}://{shown}:{self.port}"
        self.url = f"{self.base_url}/metrics"

    @property
    def running(self) -> bool:
        """True while the server listens; always False for a disabled Telemetry's."""
        return self._thread is not None and self._thread.is_alive()

    def close(self, linger: float | None = None) -> bool:
        """Stop serving and release the port; safe to call twice.

        With `linger` seconds (default: serve's `linger`), first wait until a
        GET /metrics has been answered with the latest published update, so the
        final update reaches Prometheus. Returns False if the wait timed out.
        """
        wait = self.linger if linger is None else _check_linger(linger)
        scraped = True
        if wait > 0 and self.running and self._tele is not None and self._scrapes is not None:
            latest = self._tele.snapshot().updates
            scraped = latest == 0 or self._scrapes.wait_for(latest, wait)
        if self._httpd is not None:
            if self._thread is not None and self._thread.is_alive():
                self._httpd.shutdown()
                self._thread.join()
            self._httpd.server_close()
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
    """Serve `tele` on http://addr:port/metrics from a daemon thread (port 0: any free port).

    `web_config` is an exporter-toolkit web config (a path or a loaded WebConfig)
    that adds TLS, basic auth, headers and a rate limit; the default binds loopback
    only, in plain HTTP. At most `max_connections` are open at once; more wait.
    `linger` is how long close() waits for Prometheus to scrape the final update.
    A disabled Telemetry is not served: the Server returned binds nothing.
    """
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise ValueError(f"max_connections must be a whole number >= 1, got {max_connections!r}")
    _check_linger(linger)
    config = load_web_config(web_config) if isinstance(web_config, (str, Path)) else web_config
    scheme = "https" if config is not None and config.tls is not None else "http"
    if not tele.enabled:
        return Server(None, None, scheme, linger=linger, addr=addr)
    attrs: dict[str, Any] = {"address_family": _family(addr), "max_connections": max_connections}
    if config is not None and config.tls is not None:
        attrs["ssl_context"] = config.tls.context()
    server_class = type("_Server", (BoundedServer,), attrs)
    scrapes = Scrapes()
    try:
        httpd: WSGIServer = make_server(
            addr, port, make_app(tele, config, scrapes), server_class=server_class, handler_class=QuietHandler
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(exc.errno, f"cannot listen on {addr}:{port}: address already in use") from None
        raise OSError(exc.errno, f"cannot listen on {addr}:{port}: {exc.strerror}") from None
    thread = threading.Thread(target=httpd.serve_forever, name=f"tele-exporter:{port}", daemon=True)
    thread.start()
    return Server(httpd, thread, scheme, tele=tele, scrapes=scrapes, linger=linger)


def _check_linger(linger: float) -> float:
    if isinstance(linger, bool) or not isinstance(linger, (int, float)) or not linger >= 0 or math.isinf(linger):
        raise ValueError(f"linger must be a finite number of seconds >= 0, got {linger!r}")
    return float(linger)


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET
