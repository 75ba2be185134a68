"""Connection handling: a WSGI server that serves at most `max_connections` requests at once, each on its own thread.

Bounded so that a flood of clients costs the trainer neither threads nor file descriptors
beyond the cap, and niced so that training gets the CPU first when it is short.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import ssl
import sys
import threading
import time
from collections import deque
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

CLIENT_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_CONNECTIONS = 16
# A thread whose client has not finished its request this long is cut off while other requests wait.
IDLE_GRACE_SECONDS = 0.5
SERVE_NICE = 10


def _lower_priority() -> None:
    """Run the calling thread at nice SERVE_NICE (Linux: nice is per thread), so training wins the CPU."""
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, max(SERVE_NICE, os.getpriority(os.PRIO_PROCESS, tid)))


class QuietHandler(WSGIRequestHandler):
    """No access log on stderr; a bounded wait for slow or half-open clients; TLS handshake here.

    The handshake runs in the connection's own thread, so a client that stalls it
    never blocks the accept loop or other scrapes.
    """

    timeout = CLIENT_TIMEOUT_SECONDS
    server: BoundedServer

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


class BoundedServer(WSGIServer):
    """At most `max_connections` requests served at once, one thread each; as many waiting, as many silent.

    The accept loop holds up to `max_connections` connections that have not sent
    a byte, without a thread; the oldest of them is closed when a new client
    needs its place, so held connections cannot lock scrapes out. When every thread is busy and
    requests wait, threads whose client has not finished its request within
    IDLE_GRACE_SECONDS are cut off to make room. Beyond that, clients wait in the
    kernel's listen backlog. TLS is wrapped here, handshaken on the connection's thread.
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
