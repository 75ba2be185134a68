"""Connections: one event loop that holds many clients, slow ones included, without a thread each.

It runs in the serving process (child.py). A client costs one of `max_connections` places and
nothing else; when a new client needs a place, the oldest connection that has not finished its
request gives it up, and every place has a deadline, so held connections cannot queue a scrape.
"""

from __future__ import annotations

import contextlib
import re
import selectors
import socket
import ssl
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import unquote

CLIENT_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_CONNECTIONS = 128
MAX_REQUEST_BYTES = 16384
SERVE_NICE = 10  # the serving process runs at this nice (or lower priority): training wins the CPU
MAX_REPORTS = 10  # tracebacks printed at most, so a client that keeps reaching a bug cannot flood stderr
# Connections accepted per wakeup: bounded, so a connection flood cannot starve clients already accepted.
ACCEPTS_PER_WAKEUP = 32
_CHUNK = 16384  # at most one TLS record per send, so a retried send repeats the same bytes

_REQUEST_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([^\s]+) HTTP/1\.\d")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(r"\r?\n")


@dataclass(frozen=True)
class Request:
    """A parsed HTTP/1.x request head: method, unquoted path, raw query string, lower-case header names."""

    method: str
    path: str
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str:
        """The first value of header `name` (any case), or ""."""
        return self.headers.get(name.lower(), "")


def parse_request(head: bytes) -> Request | None:
    """The request in `head` (the bytes before the blank line), or None when it is not HTTP/1.x: a 400."""
    lines = _LINE_END.split(head.decode("latin-1"))
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            return None  # no colon, an empty or padded name, or an obsolete folded line
        headers.setdefault(name.lower(), value.strip())
    path, _, query = match.group(2).partition("?")
    return Request(match.group(1), unquote(path, "latin-1"), query, headers)


def http_message(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """One whole HTTP/1.1 response that closes its connection, `body` as given (empty for HEAD)."""
    lines = [f"HTTP/1.1 {status}", f"Date: {formatdate(usegmt=True)}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    """One client: its socket, what it has sent so far, and what is left to write to it."""

    __slots__ = ("buf", "closed", "events", "on_sent", "out", "since", "sock", "state")

    def __init__(self, sock: socket.socket, since: float, state: str) -> None:
        self.sock = sock
        self.since = since  # accepted, or started writing: the deadline counts from here
        self.state = state  # handshake, reading, waiting (a complete request being answered), writing
        self.buf = bytearray()
        self.out = memoryview(b"")
        self.events = 0
        self.on_sent: Callable[[], None] | None = None
        self.closed = False


class ConnectionLoop:
    """Accepts, reads requests, writes answers; `handler(conn, request)` answers with respond(), now or later.

    At most `max_connections` are open. A connection that has not finished its request
    (nor, over TLS, its handshake) within CLIENT_TIMEOUT_SECONDS of being accepted is closed,
    as is one that has not taken its answer that long after it was written. When a new client
    needs a place, the oldest connection without a finished request is closed; with none,
    accepting pauses until a place frees and new clients wait in the kernel's listen backlog.
    """

    def __init__(
        self,
        listener: socket.socket,
        handler: Callable[[Connection, Request], None],
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = CLIENT_TIMEOUT_SECONDS,
    ) -> None:
        self.max_connections = max_connections
        self.timeout = timeout
        self._listener = listener
        self._handler = handler
        self._ssl = ssl_context
        self._selector = selectors.DefaultSelector()
        self._open: set[Connection] = set()
        self._unanswered: OrderedDict[Connection, None] = OrderedDict()  # by accept time: who gives up a place
        self._writing: OrderedDict[Connection, None] = OrderedDict()
        self._accepting = False
        self._running = False
        self.evicted = 0
        self.errors = 0
        listener.setblocking(False)
        self._listen(True)

    def watch(self, fileobj: socket.socket, callback: Callable[[], None]) -> None:
        """Call `callback` whenever `fileobj` is readable (the trainer's channel, a wakeup socket)."""
        self._selector.register(fileobj, selectors.EVENT_READ, callback)

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        return len(self._open)

    @property
    def writing(self) -> int:
        """Connections whose answer is not all written yet."""
        return len(self._writing)

    def respond(self, conn: Connection, data: bytes, on_sent: Callable[[], None] | None = None) -> None:
        """Write `data` to `conn` and close it; `on_sent` runs once all of it is written. A closed `conn` is skipped."""
        if conn.closed:
            return
        self._unanswered.pop(conn, None)
        conn.state, conn.since, conn.on_sent = "writing", time.monotonic(), on_sent
        conn.out = memoryview(data)
        self._writing[conn] = None
        self._write(conn)

    def requeue(self, conn: Connection) -> None:
        """`conn` waits for a slow check (bcrypt): it may give up its place again, like an unfinished request."""
        if not conn.closed:
            conn.since = time.monotonic()
            self._unanswered[conn] = None

    def claim(self, conn: Connection) -> None:
        """`conn` is being answered: it keeps its place until respond() is done with it."""
        self._unanswered.pop(conn, None)

    def stop_accepting(self) -> None:
        """Close the listening socket: the port is free once the open connections are done."""
        self._listen(False)
        self._listener.close()
        for conn in list(self._unanswered):
            self.close(conn)

    def run(self, tick: Callable[[float], float]) -> None:
        """Serve until stop(). `tick(now)` runs every wakeup and returns the seconds until it wants to run again."""
        self._running = True
        while self._running:
            now = time.monotonic()
            wait = tick(now)
            for queue in (self._unanswered, self._writing):
                if queue:
                    wait = min(wait, next(iter(queue)).since + self.timeout - now)
            if not self._running:
                break
            for key, _ in self._selector.select(max(wait, 0.0)):
                data = key.data
                try:
                    if data is None:
                        self._accept()
                    elif isinstance(data, Connection):
                        self._ready(data)
                    else:
                        data()
                except Exception:  # a bug that one client's request reaches must not end serving for all
                    self._report()
                    if isinstance(data, Connection):
                        self.close(data)
            self._expire(time.monotonic())
        self._selector.close()

    def stop(self) -> None:
        """Leave run() after this wakeup, closing every connection."""
        self._running = False
        for conn in list(self._open):
            self.close(conn)

    def close(self, conn: Connection) -> None:
        """Close `conn` and free its place; safe to call twice."""
        if conn.closed:
            return
        conn.closed = True
        self._open.discard(conn)
        self._unanswered.pop(conn, None)
        self._writing.pop(conn, None)
        self._interest(conn, 0)
        if not isinstance(conn.sock, ssl.SSLSocket):
            with contextlib.suppress(OSError):
                conn.sock.recv(65536)  # unread bytes would turn the close into a reset that loses the answer
        with contextlib.suppress(OSError):
            conn.sock.close()
        if not self._accepting and len(self._open) < self.max_connections:
            self._listen(True)

    # -- the events ---------------------------------------------------------------------

    def _listen(self, on: bool) -> None:
        if on == self._accepting or self._listener.fileno() < 0:
            return
        self._accepting = on
        if on:
            self._selector.register(self._listener, selectors.EVENT_READ, None)
        else:
            self._selector.unregister(self._listener)

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            if len(self._open) >= self.max_connections and not self._evict():
                self._listen(False)  # every place is being answered: new clients wait in the backlog
                return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, or the client left before we took it
                self._evict()
                return
            sock.setblocking(False)
            state = "reading"
            if self._ssl is not None:
                try:
                    sock = self._ssl.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except OSError:  # the client reset before we took it
                    sock.close()
                    continue
                state = "handshake"
            conn = Connection(sock, time.monotonic(), state)
            self._open.add(conn)
            self._unanswered[conn] = None
            self._interest(conn, selectors.EVENT_READ)

    def _evict(self) -> bool:
        """Close the oldest connection that has not finished its request; False if there is none."""
        if not self._unanswered:
            return False
        self.close(next(iter(self._unanswered)))
        self.evicted += 1
        return True

    def _expire(self, now: float) -> None:
        for queue in (self._unanswered, self._writing):
            while queue:
                conn = next(iter(queue))
                if conn.since + self.timeout > now:
                    break
                self.close(conn)

    def _report(self) -> None:
        """Print the traceback of an unexpected error, the first MAX_REPORTS times only."""
        self.errors += 1
        if self.errors <= MAX_REPORTS:
            traceback.print_exc()

    def _ready(self, conn: Connection) -> None:
        if conn.state == "handshake":
            self._handshake(conn)
        elif conn.state == "reading":
            self._read(conn)
        elif conn.state == "writing":
            self._write(conn)

    def _handshake(self, conn: Connection) -> None:
        assert isinstance(conn.sock, ssl.SSLSocket)
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._interest(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._interest(conn, selectors.EVENT_WRITE)
            return
        except (OSError, ValueError):  # a failed handshake, a plain-HTTP client, a reset
            self.close(conn)
            return
        conn.state = "reading"
        self._interest(conn, selectors.EVENT_READ)
        self._read(conn)  # the request may have come with the handshake's last flight

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                break
            except ssl.SSLWantWriteError:
                self._interest(conn, selectors.EVENT_WRITE)
                return
            except OSError:
                self.close(conn)
                return
            if not data:
                self.close(conn)
                return
            conn.buf += data
            if len(conn.buf) > MAX_REQUEST_BYTES or not isinstance(conn.sock, ssl.SSLSocket) or not conn.sock.pending():
                break
        self._interest(conn, selectors.EVENT_READ)
        end = _HEAD_END.search(conn.buf)
        if end is None or end.start() > MAX_REQUEST_BYTES:
            if len(conn.buf) > MAX_REQUEST_BYTES:
                self._fail(conn, "431 Request Header Fields Too Large")
            return
        request = parse_request(bytes(conn.buf[: end.start()]))
        conn.buf = bytearray()
        conn.state = "waiting"
        self._unanswered.pop(conn, None)
        self._interest(conn, 0)
        if request is None:
            self._fail(conn, "400 Bad Request")
        else:
            self._handler(conn, request)

    def _fail(self, conn: Connection, status: str) -> None:
        body = f"{status.split(' ', 1)[1].lower()}\n".encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        self.respond(conn, http_message(status, headers, body))

    def _write(self, conn: Connection) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out[:_CHUNK])
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                self._interest(conn, selectors.EVENT_WRITE)
                return
            except ssl.SSLWantReadError:
                self._interest(conn, selectors.EVENT_READ)
                return
            except OSError:
                self.close(conn)
                return
            conn.out = conn.out[sent:]
        on_sent = conn.on_sent
        self.close(conn)
        if on_sent is not None:
            on_sent()

    def _interest(self, conn: Connection, events: int) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self._selector.register(conn.sock, events, conn)
        elif events == 0:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events
