"""What each request gets: routing, /metrics format negotiation, and the renders cached per handed-over version.

The serving process answers from an Exposition, the latest families and document the
trainer handed over; make_app wraps the same routes as a WSGI app for in-process use.
Each format (and name[] filter) is rendered once per version, never per request.
"""

from __future__ import annotations

import gzip
import importlib.resources
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, cast
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from .connections import Request
from .handover import Feeder, FrozenRegistry, Shipment
from .source import SnapshotSource
from .web_config import WebConfig

FILTERED_CACHE_SIZE = 16

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Response = tuple[str, list[tuple[str, str]], bytes]

_PAGE = importlib.resources.files("tele_exporter.server").joinpath("page.html").read_text(encoding="utf-8").encode()
_ESCAPINGS = ("allow-utf-8", "underscores", "dots", "values")
_METHODS = "GET, HEAD, OPTIONS"
# The paths whose answer needs the trainer's state; "/" is a fixed page.
STATE_PATHS = ("/metrics", "/api/snapshot")


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


def static_response(request: Request) -> Response | None:
    """The answer that needs nothing from the trainer (404, 405, OPTIONS, the page); None for STATE_PATHS' GET/HEAD."""
    path = request.path or "/"
    if path != "/" and path not in STATE_PATHS:
        return _plain("404 Not Found", "not found\n")
    if request.method == "OPTIONS":
        return "200 OK", [("Allow", _METHODS), ("Content-Length", "0")], b""
    if request.method not in ("GET", "HEAD"):
        return _plain("405 Method Not Allowed", "method not allowed\n", [("Allow", _METHODS)])
    if path == "/":
        return "200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(_PAGE)))], _PAGE
    return None


def rate_limited(config: WebConfig | None) -> Response | None:
    """429 when the web config's token bucket is empty, checked before any password."""
    if config is not None and config.rate_limit is not None and not config.rate_limit.allow():
        return _plain("429 Too Many Requests", "too many requests\n")
    return None


def unauthorized() -> Response:
    """401 with the Basic challenge."""
    return _plain("401 Unauthorized", "unauthorized\n", [("WWW-Authenticate", 'Basic realm="tele-exporter"')])


def finish(request: Request, response: Response, extra: list[tuple[str, str]]) -> Response:
    """The response as sent: the web config's extra headers added, and no body for HEAD."""
    status, headers, body = response
    return status, headers + extra, b"" if request.method == "HEAD" else body


class Exposition:
    """The latest version the trainer handed over, and its renders: one per format, a few name[] filters.

    `metrics_time` and `api_time` are when the trainer read the state this holds (time.monotonic);
    a request that arrived after them needs a fresher ask before it can be answered.
    """

    def __init__(self) -> None:
        self.version = -1
        self.updates = 0
        self.metrics_time = -math.inf
        self.api_time = -math.inf
        self.api_version = 0
        self._families: FrozenRegistry | None = None
        self._error: str | None = None
        self._api: bytes | None = None
        self._api_error: str | None = None
        self._full: dict[str, tuple[bytes, list[bytes]]] = {}
        self._filtered: OrderedDict[tuple[str, tuple[str, ...]], tuple[bytes, list[bytes]]] = OrderedDict()

    def apply(self, shipment: Shipment) -> None:
        """Take what the trainer shipped; a version the asker already had ships nothing and keeps the renders."""
        if shipment.version != self.version:
            self.version, self.updates = shipment.version, shipment.updates
            families = shipment.families
            self._families = FrozenRegistry(families) if families is not None else None
            self._error = shipment.error
            self._full.clear()
            self._filtered.clear()
        self.metrics_time = shipment.time
        if shipment.api_checked:
            if shipment.api_version != self.api_version:
                self.api_version, self._api, self._api_error = shipment.api_version, shipment.api, shipment.api_error
            self.api_time = shipment.time

    def current(self, request: Request, arrived: float) -> bool:
        """True when this holds state read after `arrived`, so `request` may be answered from it."""
        return (self.api_time if request.path == "/api/snapshot" else self.metrics_time) >= arrived

    def answer(self, request: Request) -> Response:
        """GET or HEAD of /metrics or /api/snapshot, from what this holds (503 before the trainer's first answer)."""
        if request.path == "/api/snapshot":
            if self._api is None:
                return _unavailable(self._api_error)
            headers = [
                ("Content-Type", "application/json; charset=utf-8"),
                ("Content-Length", str(len(self._api))),
                ("Cache-Control", "no-store"),
            ]
            return "200 OK", headers, self._api
        if self._families is None:
            return _unavailable(self._error)
        accept = negotiate(request.header("accept"))
        encoder, content_type = choose_encoder(accept)
        names = tuple(sorted(set(parse_qs(request.query).get("name[]", []))))
        hit = self._filtered.get((accept, names)) if names else self._full.get(accept)
        if hit is None:
            registry = self._families.restricted_registry(names) if names else self._families
            hit = (encoder(cast(CollectorRegistry, registry)), [])
            if names:
                self._filtered[(accept, names)] = hit
                while len(self._filtered) > FILTERED_CACHE_SIZE:
                    self._filtered.popitem(last=False)
            else:
                self._full[accept] = hit
        elif names:
            self._filtered.move_to_end((accept, names))
        body, zipped = hit
        headers = [("Content-Type", content_type)]
        if gzip_accepted(request.header("accept-encoding")):
            if not zipped:
                zipped.append(gzip.compress(body, compresslevel=6))
            body = zipped[0]
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        return "200 OK", headers, body


def _unavailable(error: str | None) -> Response:
    if error is not None:
        return _plain("500 Internal Server Error", "the trainer could not render this; see its log\n")
    return _plain("503 Service Unavailable", "the trainer has not answered yet\n")


def make_app(source: SnapshotSource, web_config: WebConfig | None = None, scrapes: Scrapes | None = None) -> WSGIApp:
    """The same routes as a WSGI application, served from `source` in this process: /metrics, /, /api/snapshot.

    For tests and for mounting in a server of one's own; serve() answers from a separate process instead.
    """
    feeder = Feeder(source)
    exposition = Exposition()
    lock = threading.Lock()
    scrapes = scrapes or Scrapes()
    extra = list(web_config.headers.items()) if web_config is not None else []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        headers = {k[5:].replace("_", "-").lower(): str(v) for k, v in environ.items() if k.startswith("HTTP_")}
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO") or "/"
        request = Request(method, path, environ.get("QUERY_STRING", ""), headers)
        response = rate_limited(web_config)
        if response is None and web_config is not None:
            response = None if web_config.check_authorization(request.header("authorization")) else unauthorized()
        response = response or static_response(request)
        if response is None:
            with lock:
                shipment = feeder.ship(exposition.version, path == "/api/snapshot", exposition.api_version)
                exposition.apply(shipment)
                response = exposition.answer(request)
                updates = exposition.updates
            if request.method == "GET" and request.path == "/metrics" and response[0] == "200 OK":
                scrapes.served(updates)
        status, out, body = finish(request, response, extra)
        start_response(status, out)
        return [body]

    return app


def _plain(status: str, body: str, extra: list[tuple[str, str]] | None = None) -> Response:
    data = body.encode()
    return (
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))] + (extra or []),
        data,
    )
