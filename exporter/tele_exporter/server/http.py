"""The HTTP endpoint: /metrics through prometheus_client's exposition, plus a landing page.

Connections are capped: `max_connections` requests served, each on a thread, as
many waiting for a thread and as many silent ones; beyond that, clients wait in
the kernel's listen backlog and cost the trainer no thread and no file descriptor.
Each request is served on its own thread at a lower CPU priority (nice 10 on
Linux), so training gets the CPU first when it is short; what is served is
rendered once per published snapshot and format, never per request.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import importlib.resources
import json
import math
import os
import selectors
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from ..catalog.model import Level
from .web_config import WebConfig, load_web_config

if TYPE_CHECKING:
    from ..telemetry.telemetry import Telemetry

DEFAULT_PORT = 9842
DEFAULT_ADDR = "127.0.0.1"
CLIENT_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_CONNECTIONS = 16
# A thread whose client has not finished its request this long is cut off while other requests wait.
IDLE_GRACE_SECONDS = 0.5
SERVE_NICE = 10
FILTERED_CACHE_SIZE = 16

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Response = tuple[str, list[tuple[str, str]], bytes]
Route = Callable[[dict[str, Any]], Response]

_LANDING = importlib.resources.files("tele_exporter.server").joinpath("page.html").read_text(encoding="utf-8")
_ESCAPINGS = ("allow-utf-8", "underscores", "dots", "values")
_METHODS = "GET, HEAD, OPTIONS"


class PortInUseError(OSError):
    """The listen address is taken by another process."""


def _lower_priority() -> None:
    """Run the calling thread at nice SERVE_NICE (Linux: nice is per thread), so training wins the CPU."""
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, max(SERVE_NICE, os.getpriority(os.PRIO_PROCESS, tid)))


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr; a bounded wait for slow or half-open clients; TLS handshake here.

    The handshake runs in the connection's own thread, so a client that stalls it
    never blocks the accept loop or other scrapes.
    """

    timeout = CLIENT_TIMEOUT_SECONDS
    server: _BoundedServer

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.request_read(self.request)
        return ok

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ssl.SSLError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        return


class _BoundedServer(WSGIServer):
    """At most `max_connections` requests served at once, one thread each; as many waiting, as many silent.

    The accept loop holds up to `max_connections` connections that have not sent
    a byte, without a thread; the oldest of them is closed when a new client
    needs its place, so held connections cannot lock scrapes out. When every thread is busy and
    requests wait, threads whose client has not finished its request within
    IDLE_GRACE_SECONDS are cut off to make room. TLS is wrapped here, handshaken
    on the connection's thread.
    """

    allow_reuse_address = True
    request_queue_size = 128
    ssl_context: ssl.SSLContext | None = None
    max_connections = DEFAULT_MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._reading: dict[socket.socket, float] = {}
        self._reading_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        _lower_priority()
        self._stopped.clear()
        silent: dict[socket.socket, tuple[Any, float]] = {}  # accepted, nothing sent yet: no thread
        ready: deque[tuple[socket.socket, Any]] = deque()  # sent something, waiting for a thread
        listening = True
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self, selectors.EVENT_READ)
                while not self._stop.is_set():
                    for key, _ in sel.select(IDLE_GRACE_SECONDS / 5):
                        if key.fileobj is self:
                            self._accept(sel, silent)
                        elif key.fileobj in silent:  # not closed to make room earlier in this batch
                            sock = key.fileobj
                            assert isinstance(sock, socket.socket)
                            sel.unregister(sock)
                            ready.append((sock, silent.pop(sock)[0]))
                    while ready and self._slots.acquire(blocking=False):
                        threading.Thread(target=self._serve, args=ready.popleft(), daemon=True).start()
                    if ready:
                        self._close_idle()
                    self._expire(sel, silent)
                    # With as many requests waiting as are served, new clients wait in the backlog.
                    full = len(ready) >= self.max_connections
                    if full == listening:
                        listening = not full
                        (sel.unregister(self) if full else sel.register(self, selectors.EVENT_READ))
        finally:
            for sock in [*silent, *(sock for sock, _ in ready)]:
                self.shutdown_request(sock)
            self._stopped.set()

    def _accept(self, sel: selectors.BaseSelector, silent: dict[socket.socket, tuple[Any, float]]) -> None:
        if len(silent) >= self.max_connections:
            oldest = min(silent, key=lambda s: silent[s][1])
            sel.unregister(oldest)
            del silent[oldest]
            self.shutdown_request(oldest)
        try:
            sock, addr = self.get_request()
        except OSError:
            return
        silent[sock] = (addr, time.monotonic())
        sel.register(sock, selectors.EVENT_READ)

    def _expire(self, sel: selectors.BaseSelector, silent: dict[socket.socket, tuple[Any, float]]) -> None:
        cutoff = time.monotonic() - CLIENT_TIMEOUT_SECONDS
        for sock in [s for s, (_, since) in silent.items() if since < cutoff]:
            sel.unregister(sock)
            del silent[sock]
            self.shutdown_request(sock)

    def shutdown(self) -> None:
        self._stop.set()
        self._stopped.wait()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def request_read(self, sock: socket.socket) -> None:
        """The client sent its request: it is no longer idle."""
        with self._reading_lock:
            self._reading.pop(sock, None)

    def _serve(self, sock: socket.socket, addr: Any) -> None:
        _lower_priority()
        with self._reading_lock:
            self._reading[sock] = time.monotonic()
        try:
            self.finish_request(sock, addr)
        except OSError:
            pass  # a broken client connection is that client's problem, not a traceback on stderr
        finally:
            self.request_read(sock)
            self.shutdown_request(sock)
            self._slots.release()

    def _close_idle(self) -> None:
        cutoff = time.monotonic() - IDLE_GRACE_SECONDS
        with self._reading_lock:
            idle = [sock for sock, since in self._reading.items() if since < cutoff]
        for sock in idle:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # wakes its thread; the TLS layer is bypassed


def negotiate(accept: str) -> str:
    """The canonical Accept header for the format served to `accept`, from a small fixed set.

    Mirrors prometheus_client's choice, but the result never carries the client's
    own strings: versions map to 1.0.0 or 2.0.0 and invalid ones are skipped, so a
    cache keyed by it stays small and Content-Type never echoes the request.
    "" is the text format 0.0.4, the fallback.
    """
    for entry in accept.split(","):
        media, *params = (part.strip() for part in entry.split(";"))
        if media not in ("application/openmetrics-text", "text/plain"):
            continue
        opts = dict(p.split("=", 1) for p in params if "=" in p)
        escaping = opts.get("escaping", "underscores")
        escaping = escaping if escaping in _ESCAPINGS else "underscores"
        if media == "application/openmetrics-text" and "version" not in opts:
            return "application/openmetrics-text"
        version = _version(opts.get("version", ""))
        if version is None or version < (1, 0, 0) or version >= (3,):
            continue
        if media == "text/plain":
            return f"text/plain; version=1.0.0; escaping={escaping}"
        return f"application/openmetrics-text; version={'2.0.0' if version >= (2,) else '1.0.0'}; escaping={escaping}"
    return ""


def _version(text: str) -> tuple[int, ...] | None:
    parts = text.split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() and len(p) <= 4 for p in parts):
        return None
    return tuple(int(p) for p in parts)


class Scrapes:
    """The latest update a GET /metrics has been answered with, so that close can wait for the final one."""

    def __init__(self) -> None:
        self._served = -1
        self._changed = threading.Condition()

    def served(self, updates: int) -> None:
        with self._changed:
            if updates > self._served:
                self._served = updates
                self._changed.notify_all()

    def wait_for(self, updates: int, timeout: float) -> bool:
        """True once a scrape has carried `updates` or more, False if `timeout` seconds passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._served >= updates, timeout)


def make_app(tele: Telemetry, web_config: WebConfig | None = None, scrapes: Scrapes | None = None) -> WSGIApp:
    """The WSGI application: /metrics, the page at /, /api/snapshot; 401, 404, 405 and 429 otherwise."""
    routes: dict[str, Route] = {
        "/metrics": _metrics(tele, scrapes or Scrapes()),
        "/": _static(_LANDING, "text/html; charset=utf-8"),
        "/api/snapshot": _snapshot_api(tele),
    }
    extra = list(web_config.headers.items()) if web_config is not None else []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        status, headers, body = _route(routes, web_config, method, environ)
        start_response(status, headers + extra)
        return [b""] if method == "HEAD" else [body]

    return app


def _route(routes: dict[str, Route], config: WebConfig | None, method: str, environ: dict[str, Any]) -> Response:
    if config is not None and config.rate_limit is not None and not config.rate_limit.allow():
        return _plain("429 Too Many Requests", "too many requests\n")
    if config is not None and not config.check_authorization(environ.get("HTTP_AUTHORIZATION")):
        return _plain("401 Unauthorized", "unauthorized\n", [("WWW-Authenticate", 'Basic realm="tele-exporter"')])
    route = routes.get(environ.get("PATH_INFO") or "/")
    if route is None:
        return _plain("404 Not Found", "not found\n")
    if method == "OPTIONS":
        return "200 OK", [("Allow", _METHODS), ("Content-Length", "0")], b""
    if method not in ("GET", "HEAD"):
        return _plain("405 Method Not Allowed", "method not allowed\n", [("Allow", _METHODS)])
    return route(environ)


def _metrics(tele: Telemetry, scrapes: Scrapes) -> Route:
    """/metrics rendered once per published snapshot and negotiated format, then served as bytes.

    Only for a registry Telemetry owns: nothing else can change between two
    snapshots but the error counters, which are part of the cache key. Filtered
    queries (name[]=...) get a small LRU of their own; other parameters are ignored.
    """
    full: dict[str, tuple[object, object, bytes, bytes]] = {}
    filtered: OrderedDict[tuple[str, tuple[str, ...]], tuple[object, object, bytes, bytes]] = OrderedDict()
    lock = threading.Lock()

    def route(environ: dict[str, Any]) -> Response:
        accept = negotiate(environ.get("HTTP_ACCEPT", ""))
        encoder, content_type = choose_encoder(accept)
        names = tuple(sorted(set(parse_qs(environ.get("QUERY_STRING", "")).get("name[]", []))))
        registry: CollectorRegistry = tele.registry.restricted_registry(names) if names else tele.registry  # type: ignore[assignment]
        scraped = environ.get("REQUEST_METHOD", "GET") == "GET"
        if not tele.owns_registry:
            updates = tele.snapshot().updates
            body = encoder(registry)
            if scraped:
                scrapes.served(updates)
            return _metrics_response(environ, content_type, body, gzip.compress(body, compresslevel=6))
        cache: dict[Any, tuple[object, object, bytes, bytes]] = filtered if names else full
        key: Any = (accept, names) if names else accept
        snapshot, errors = tele.snapshot(), tele.errors()
        with lock:
            hit = cache.get(key)
        if hit is None or hit[0] is not snapshot or hit[1] != errors:
            body = encoder(registry)
            hit = (snapshot, errors, body, gzip.compress(body, compresslevel=6))
            with lock:
                cache[key] = hit
                if names:
                    filtered.move_to_end(key)
                    while len(filtered) > FILTERED_CACHE_SIZE:
                        filtered.popitem(last=False)
        if scraped:
            scrapes.served(snapshot.updates)
        return _metrics_response(environ, content_type, hit[2], hit[3])

    return route


def _metrics_response(environ: dict[str, Any], content_type: str, body: bytes, zipped: bytes) -> Response:
    headers = [("Content-Type", content_type)]
    if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
        body = zipped
        headers.append(("Content-Encoding", "gzip"))
    headers.append(("Content-Length", str(len(body))))
    return "200 OK", headers, body


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
                # This run's levels: the catalog's, or where Telemetry(thresholds=...) moved them.
                **({"levels": [_level(level) for level in spec.levels]} if spec.levels else {}),
            }
            for spec in catalog
            if spec.type != "histogram"
        },
        "snapshot": tele.snapshot().to_dict(catalog),
    }


def _level(level: Level) -> dict[str, Any]:
    """A level as the document gives it: interval bounds (null for -inf and +inf) and which ends are included."""
    iv = level.when
    return {
        "name": level.name,
        "status": level.status,
        "from": iv.low if math.isfinite(iv.low) else None,
        "from_included": iv.low_closed,
        "to": iv.high if math.isfinite(iv.high) else None,
        "to_included": iv.high_closed,
    }


def _snapshot_api(tele: Telemetry) -> Route:
    """/api/snapshot, rendered once per published snapshot like /metrics."""
    cached: list[tuple[object, bytes]] = []
    lock = threading.Lock()

    def route(environ: dict[str, Any]) -> Response:
        snapshot = tele.snapshot()
        with lock:
            hit = cached[0] if cached else None
        if hit is None or hit[0] is not snapshot:
            data = json.dumps(snapshot_document(tele), ensure_ascii=False, allow_nan=False).encode()
            hit = (snapshot, data)
            with lock:
                cached[:] = [hit]
        headers = [
            ("Content-Type", "application/json; charset=utf-8"),
            ("Content-Length", str(len(hit[1]))),
            ("Cache-Control", "no-store"),
        ]
        return "200 OK", headers, hit[1]

    return route


def _static(body: str, content_type: str) -> Route:
    data = body.encode()

    def route(environ: dict[str, Any]) -> Response:
        return "200 OK", [("Content-Type", content_type), ("Content-Length", str(len(data)))], data

    return route


def _plain(status: str, body: str, extra: list[tuple[str, str]] | None = None) -> Response:
    data = body.encode()
    return (
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))] + (extra or []),
        data,
    )


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
        tele: Telemetry | None = None,
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
    tele: Telemetry,
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
    server_class = type("_Server", (_BoundedServer,), attrs)
    scrapes = Scrapes()
    try:
        httpd: WSGIServer = make_server(
            addr, port, make_app(tele, config, scrapes), server_class=server_class, handler_class=_QuietHandler
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
