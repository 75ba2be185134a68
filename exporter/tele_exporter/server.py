"""The HTTP endpoint: /metrics through prometheus_client's exposition, plus a landing page.

A threaded WSGI server on a daemon thread; each request gets its own thread, so
a slow client never holds up a scrape and never touches the training thread.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

if TYPE_CHECKING:
    from .telemetry import Telemetry

DEFAULT_PORT = 9842
DEFAULT_ADDR = "127.0.0.1"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_LANDING = """<!doctype html>
<html><head><meta charset="utf-8"><title>tele-exporter</title></head>
<body><h1>tele-exporter</h1>
<p>Training-health telemetry for PyTorch reinforcement learning.</p>
<p><a href="metrics">/metrics</a></p></body></html>
"""


class PortInUseError(OSError):
    """The listen address is taken by another process."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: a trainer's console is for the trainer."""

    def log_message(self, format: str, *args: Any) -> None:
        return


def make_app(tele: Telemetry) -> WSGIApp:
    """The WSGI application: /metrics, the landing page at /, 404 and 405 otherwise."""
    metrics = make_wsgi_app(tele.registry)
    routes: dict[str, WSGIApp] = {
        "/metrics": metrics,
        "/": _static(_LANDING, "text/html; charset=utf-8"),
        "/api/snapshot": _snapshot_api(tele),
    }

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        route = routes.get(environ.get("PATH_INFO") or "/")
        if route is None:
            return _plain(start_response, "404 Not Found", "not found\n")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", "method not allowed\n", [("Allow", "GET, HEAD")])
        return route(environ, start_response)

    return app


def snapshot_document(tele: Telemetry) -> dict[str, Any]:
    """The /api/snapshot document: the latest snapshot with display fields, and catalog facts.

    Version 1. Values that are NaN or Inf are the strings "NaN"/"Inf"; statuses are
    ok, warning, critical or neutral, and `colours` maps them to colour names.
    """
    catalog = tele.catalog
    return {
        "version": 1,
        "colours": dict(catalog.colours),
        "metrics": {
            spec.id: {"name": spec.name, "tele": list(spec.tele), "question": spec.question, "precision": spec.precision}
            for spec in catalog
            if spec.type != "histogram"
        },
        "snapshot": tele.snapshot().to_dict(catalog),
    }


def _snapshot_api(tele: Telemetry) -> WSGIApp:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        data = json.dumps(snapshot_document(tele), ensure_ascii=False, allow_nan=False).encode()
        headers = [
            ("Content-Type", "application/json; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ]
        start_response("200 OK", headers)
        return [data]

    return app


def _static(body: str, content_type: str) -> WSGIApp:
    data = body.encode()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(data)))])
        return [data]

    return app


def _plain(
    start_response: StartResponse, status: str, body: str, extra: list[tuple[str, str]] | None = None
) -> Iterable[bytes]:
    data = body.encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
    start_response(status, headers + (extra or []))
    return [data]


class Server:
    """A running exporter; `.url` is the /metrics URL, `.close()` stops it."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        host, port = httpd.server_address[:2]
        self.addr: str = str(host)
        self.port: int = int(port)
        shown = f"[{self.addr}]" if ":" in self.addr else self.addr
        self.base_url = f"http://{shown}:{self.port}"
        self.url = f"{self.base_url}/metrics"

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(tele: Telemetry, port: int = DEFAULT_PORT, addr: str = DEFAULT_ADDR) -> Server:
    """Serve `tele` on http://addr:port/metrics from a daemon thread (port 0: any free port)."""
    server_class = type("_Server", (_ThreadingServer,), {"address_family": _family(addr)})
    try:
        httpd: WSGIServer = make_server(
            addr, port, make_app(tele), server_class=server_class, handler_class=_QuietHandler
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(exc.errno, f"cannot listen on {addr}:{port}: address already in use") from None
        raise OSError(exc.errno, f"cannot listen on {addr}:{port}: {exc.strerror}") from None
    thread = threading.Thread(target=httpd.serve_forever, name=f"tele-exporter:{port}", daemon=True)
    thread.start()
    return Server(httpd, thread)


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET
