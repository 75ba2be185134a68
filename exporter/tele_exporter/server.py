"""The HTTP endpoint: /metrics through prometheus_client's exposition, plus a landing page.

A threaded WSGI server on a daemon thread; each request gets its own thread, so
a slow client never holds up a scrape and never touches the training thread.
"""

from __future__ import annotations

import errno
import gzip
import importlib.resources
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import choose_encoder, gzip_accepted

from .webconfig import WebConfig, load_web_config

if TYPE_CHECKING:
    from .telemetry import Telemetry

DEFAULT_PORT = 9842
DEFAULT_ADDR = "127.0.0.1"
CLIENT_TIMEOUT_SECONDS = 10.0

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_LANDING = importlib.resources.files("tele_exporter").joinpath("page.html").read_text(encoding="utf-8")


class PortInUseError(OSError):
    """The listen address is taken by another process."""


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr; a bounded wait for slow or half-open clients; TLS handshake here.

    The handshake runs in the connection's own thread, so a client that stalls it
    never blocks the accept loop or other scrapes.
    """

    timeout = CLIENT_TIMEOUT_SECONDS

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ssl.SSLError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        return


class _TLSServerMixin:
    """Wraps accepted sockets in TLS without a handshake; the handler thread does it."""

    ssl_context: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()  # type: ignore[misc]
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # a broken client connection is that client's problem, not a traceback on stderr


class _ThreadingServer(_TLSServerMixin, ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def make_app(tele: Telemetry, web_config: WebConfig | None = None) -> WSGIApp:
    """The WSGI application: /metrics, the page at /, /api/snapshot; 401, 404 and 405 otherwise."""
    metrics = _cached_metrics(tele) if tele.owns_registry else make_wsgi_app(tele.registry)
    routes: dict[str, WSGIApp] = {
        "/metrics": metrics,
        "/": _static(_LANDING, "text/html; charset=utf-8"),
        "/api/snapshot": _snapshot_api(tele),
    }

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if web_config is not None and not web_config.check_authorization(environ.get("HTTP_AUTHORIZATION")):
            return _plain(
                start_response,
                "401 Unauthorized",
                "unauthorized\n",
                [("WWW-Authenticate", 'Basic realm="tele-exporter"')],
            )
        route = routes.get(environ.get("PATH_INFO") or "/")
        if route is None:
            return _plain(start_response, "404 Not Found", "not found\n")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", "method not allowed\n", [("Allow", "GET, HEAD")])
        return route(environ, start_response)

    return app


def _cached_metrics(tele: Telemetry) -> WSGIApp:
    """/metrics rendered once per published snapshot and format, then served as bytes.

    Only for a registry Telemetry owns: nothing else can change between two
    snapshots but the error counters, which are part of the cache key. Queries
    with parameters (name[] filters) go to prometheus_client's own app.
    """
    fallback = make_wsgi_app(tele.registry)
    cache: dict[str, tuple[object, object, bytes, bytes]] = {}
    lock = threading.Lock()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("QUERY_STRING"):
            filtered: Iterable[bytes] = fallback(environ, start_response)
            return filtered
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        snapshot, errors = tele.snapshot(), tele.errors()
        with lock:
            hit = cache.get(content_type)
        if hit is None or hit[0] is not snapshot or hit[1] != errors:
            body = encoder(tele.registry)
            hit = (snapshot, errors, body, gzip.compress(body, compresslevel=6))
            with lock:
                cache[content_type] = hit
        headers = [("Content-Type", content_type)]
        body = hit[2]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = hit[3]
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

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
            spec.id: {
                "name": spec.name,
                "tele": list(spec.tele),
                "question": spec.question,
                "precision": spec.precision,
            }
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

    def __init__(self, httpd: WSGIServer, thread: threading.Thread, scheme: str = "http") -> None:
        self._httpd = httpd
        self._thread = thread
        host, port = httpd.server_address[:2]
        self.addr: str = str(host)
        self.port: int = int(port)
        shown = f"[{self.addr}]" if ":" in self.addr else self.addr
        self.base_url = f"{scheme}://{shown}:{self.port}"
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


def serve(
    tele: Telemetry,
    port: int = DEFAULT_PORT,
    addr: str = DEFAULT_ADDR,
    web_config: WebConfig | str | Path | None = None,
) -> Server:
    """Serve `tele` on http://addr:port/metrics from a daemon thread (port 0: any free port).

    `web_config` is an exporter-toolkit web config (a path or a loaded WebConfig)
    that adds TLS and basic auth; the default binds loopback only, in plain HTTP.
    """
    config = load_web_config(web_config) if isinstance(web_config, (str, Path)) else web_config
    attrs: dict[str, Any] = {"address_family": _family(addr)}
    if config is not None and config.tls is not None:
        attrs["ssl_context"] = config.tls.context()
    server_class = type("_Server", (_ThreadingServer,), attrs)
    try:
        httpd: WSGIServer = make_server(
            addr, port, make_app(tele, config), server_class=server_class, handler_class=_QuietHandler
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(exc.errno, f"cannot listen on {addr}:{port}: address already in use") from None
        raise OSError(exc.errno, f"cannot listen on {addr}:{port}: {exc.strerror}") from None
    thread = threading.Thread(target=httpd.serve_forever, name=f"tele-exporter:{port}", daemon=True)
    thread.start()
    scheme = "https" if config is not None and config.tls is not None else "http"
    return Server(httpd, thread, scheme)


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET
