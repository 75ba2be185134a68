"""The WSGI application: routing, auth and rate limit, /metrics format negotiation, and the per-snapshot caches.

What is served is rendered once per published snapshot and format, never per request,
so scrapes cost the trainer little however often they come.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from . import api
from .source import SnapshotSource
from .web_config import WebConfig

FILTERED_CACHE_SIZE = 16

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Response = tuple[str, list[tuple[str, str]], bytes]
Route = Callable[[dict[str, Any]], Response]

_LANDING = importlib.resources.files("tele_exporter.server").joinpath("page.html").read_text(encoding="utf-8")
_ESCAPINGS = ("allow-utf-8", "underscores", "dots", "values")
_METHODS = "GET, HEAD, OPTIONS"


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


def make_app(source: SnapshotSource, web_config: WebConfig | None = None, scrapes: Scrapes | None = None) -> WSGIApp:
    """The WSGI application: /metrics, the page at /, /api/snapshot; 401, 404, 405 and 429 otherwise."""
    routes: dict[str, Route] = {
        "/metrics": _metrics(source, scrapes or Scrapes()),
        "/": _static(_LANDING, "text/html; charset=utf-8"),
        "/api/snapshot": _snapshot_api(source),
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


def _metrics(source: SnapshotSource, scrapes: Scrapes) -> Route:
    """/metrics rendered once per published snapshot and negotiated format, then served as bytes.

    Only for a registry the source owns: nothing else can change between two
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
        registry: CollectorRegistry = source.registry.restricted_registry(names) if names else source.registry  # type: ignore[assignment]
        scraped = environ.get("REQUEST_METHOD", "GET") == "GET"
        if not source.owns_registry:
            updates = source.snapshot().updates
            body = encoder(registry)
            if scraped:
                scrapes.served(updates)
            return _metrics_response(environ, content_type, body, gzip.compress(body, compresslevel=6))
        cache: dict[Any, tuple[object, object, bytes, bytes]] = filtered if names else full
        key: Any = (accept, names) if names else accept
        snapshot, errors = source.snapshot(), source.errors()
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


def _snapshot_api(source: SnapshotSource) -> Route:
    """/api/snapshot, rendered once per published snapshot like /metrics."""
    cached: list[tuple[object, bytes]] = []
    lock = threading.Lock()

    def route(environ: dict[str, Any]) -> Response:
        snapshot = source.snapshot()
        with lock:
            hit = cached[0] if cached else None
        if hit is None or hit[0] is not snapshot:
            data = json.dumps(api.snapshot_document(source), ensure_ascii=False, allow_nan=False).encode()
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
