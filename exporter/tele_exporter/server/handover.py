"""What the trainer hands the serving process: the collected metric families and the /api/snapshot document.

The trainer collects its registry and renders the document at most once per published snapshot
(per ask, for a registry it shares with other code), and only when the serving process asks;
everything per request (formats, gzip, name[] filters, HTTP) happens on the other side.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample, Timestamp

from . import api
from .source import SnapshotSource

# A message from the serving process is a few dozen bytes; one larger than this is a broken child.
CHILD_MESSAGE_LIMIT = 1 << 16
TRAINER_MESSAGE_LIMIT = 1 << 30

_log = logging.getLogger("tele_exporter")
_LENGTH = struct.Struct("!I")


def send_frame(sock: socket.socket, payload: bytes) -> None:
    """Write one length-prefixed message."""
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def recv_frame(sock: socket.socket, limit: int) -> bytes | None:
    """Read one length-prefixed message (blocking); None at end of stream. A length over `limit` is an OSError."""
    head = _recv_exactly(sock, _LENGTH.size)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    if length > limit:
        raise OSError(f"a {length}-byte message, over the {limit}-byte limit")
    body = _recv_exactly(sock, length)
    if body is None:
        raise OSError("the stream ended inside a message")
    return body


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            if data:
                raise OSError("the stream ended inside a message")
            return None
        data += chunk
    return bytes(data)


class FrameBuffer:
    """Splits a non-blocking stream into the length-prefixed messages it carries."""

    def __init__(self, limit: int) -> None:
        self._data = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        """Add what was read; returns the messages now complete, in order."""
        self._data += data
        frames = []
        while len(self._data) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._data)
            if length > self._limit:
                raise OSError(f"a {length}-byte message, over the {self._limit}-byte limit")
            end = _LENGTH.size + length
            if len(self._data) < end:
                break
            frames.append(bytes(self._data[_LENGTH.size : end]))
            del self._data[:end]
        return frames


@dataclass(frozen=True)
class Shipment:
    """The trainer's answer to one ask, read at `time` (time.monotonic, the same clock in both processes).

    `families` and `api` are None when the asker already has that version. `cost` is the
    trainer's CPU seconds for the answer, which paces the next ask.
    """

    time: float
    version: int
    updates: int
    families: list[Metric] | None
    error: str | None
    api_checked: bool
    api_version: int
    api: bytes | None
    api_error: str | None
    cost: float


def portable_families(registry: CollectorRegistry) -> list[Metric]:
    """One collect of `registry` as plain prometheus_client Metrics and Samples, which any process can unpickle.

    A custom collector's own Metric subclass, or a numpy number, would not load in a
    process that lacks its module; the encoders read nothing but these five fields.
    """
    families = []
    for metric in registry.collect():
        plain = Metric.__new__(Metric)
        plain.name, plain.documentation, plain.type, plain.unit = (
            str(metric.name),
            str(metric.documentation),
            str(metric.type),
            str(metric.unit),
        )
        plain.samples = [_plain_sample(s) for s in metric.samples]
        families.append(plain)
    return families


def _plain_sample(s: Sample) -> Sample:
    value = s.value if type(s.value) in (int, float) else float(s.value)
    labels = {str(k): str(v) for k, v in s.labels.items()}
    timestamp = s.timestamp
    if timestamp is not None and type(timestamp) not in (int, float, Timestamp):
        timestamp = float(timestamp)
    return Sample(str(s.name), labels, value, timestamp, s.exemplar, s.native_histogram)


class FrozenRegistry:
    """The families of one collect, as a registry the encoders render as often as needed."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        """The families, as collected."""
        return iter(self._families)

    def restricted_registry(self, names: Iterable[str]) -> FrozenRegistry:
        """Only the samples named in `names`, as prometheus_client's restricted registry gives them."""
        wanted = set(names)
        restricted = (family._restricted_metric(wanted) for family in self._families)  # type: ignore[no-untyped-call]
        return FrozenRegistry(m for m in restricted if m is not None)


class Feeder:
    """The trainer's side: answers asks from the source, collecting at most once per snapshot it owns.

    For a registry the source owns, nothing but the source changes it, so a version is a
    (snapshot, errors) pair and an ask that finds the same pair ships nothing new. A shared
    registry (Telemetry(registry=...)) may change at any time: every ask collects it afresh.
    """

    def __init__(self, source: SnapshotSource) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._version = 0
        self._key: tuple[object, dict[str, int]] | None = None
        self._families: list[Metric] | None = None
        self._error: str | None = None
        self._api: tuple[object, int, bytes | None, str | None] | None = None
        self.asks = 0

    def ship(self, have: int, want_api: bool, have_api: int) -> Shipment:
        """What an asker holding version `have` (and document `have_api`) needs to be current now."""
        cpu = time.thread_time()
        now = time.monotonic()
        source = self._source
        with self._lock:
            self.asks += 1
            snapshot = source.snapshot()
            if source.owns_registry:
                errors = source.errors()
                if self._key is None or self._key[0] is not snapshot or self._key[1] != errors or self._error:
                    self._next_version((snapshot, errors))  # a failed collect is tried again, paced like any ask
            else:
                self._next_version(None)
            if have != self._version and self._families is None and self._error is None:
                try:
                    self._families = portable_families(source.registry)
                except Exception as exc:  # a user's collector failed: a 500 for this version, and a log line
                    self._error = f"{type(exc).__name__}: {exc}"
                    _log.exception("tele-exporter: collecting the registry for /metrics failed")
            stale = have != self._version
            if want_api and (self._api is None or self._api[0] is not snapshot or self._api[3] is not None):
                self._api = (snapshot, (self._api[1] if self._api else 0) + 1, *self._document())
            document = self._api if want_api else None
            return Shipment(
                time=now,
                version=self._version,
                updates=snapshot.publications,  # finish() counts: close() lingers until it is scraped
                families=self._families if stale else None,
                error=self._error if stale else None,
                api_checked=document is not None,
                api_version=document[1] if document else 0,
                api=document[2] if document and document[1] != have_api else None,
                api_error=document[3] if document and document[1] != have_api else None,
                cost=time.thread_time() - cpu,
            )

    def _next_version(self, key: tuple[object, dict[str, int]] | None) -> None:
        self._version += 1
        self._key = key
        self._families, self._error = None, None

    def _document(self) -> tuple[bytes | None, str | None]:
        try:
            doc = api.snapshot_document(self._source)
            return json.dumps(doc, ensure_ascii=False, allow_nan=False).encode(), None
        except Exception as exc:
            _log.exception("tele-exporter: rendering /api/snapshot failed")
            return None, f"{type(exc).__name__}: {exc}"
