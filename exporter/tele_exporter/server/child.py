"""The serving process: every client's request is read, checked and answered here, never in the trainer.

serve() starts it with the bound listening socket and one end of a socket pair to the trainer.
Requests that need the trainer's state wait for an ask: at most one is in flight, the next
waits at least ASK_INTERVAL and `cost / TRAINER_SHARE`, so serving takes a bounded share of the
trainer whatever the clients do, and each answer is read after its request arrived.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import queue
import signal
import socket
import ssl
import threading
import time
from collections import deque
from typing import Any

from . import routes
from .connections import Connection, ConnectionLoop, Request, http_message
from .handover import TRAINER_MESSAGE_LIMIT, FrameBuffer, Shipment, recv_frame, send_frame
from .web_config import WebConfig

ASK_INTERVAL = 0.01  # seconds between two asks at least
TRAINER_SHARE = 0.02  # an ask that cost the trainer c CPU seconds waits c / TRAINER_SHARE before the next
MAX_ASK_GAP = 5.0  # but never longer than this, however costly the trainer's collect (a shared registry)
ASK_TIMEOUT = 2.0  # a trainer silent this long (a long call holding the GIL): serve what it gave last
STOP_GRACE = 2.0  # seconds to finish writing answers once told to stop
_PARENT_CHECK = 1.0


def main(listener_fd: int, control_fd: int) -> int:
    """Run the serving process until the trainer says stop or goes away; its first message is the settings."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer, which may still want its final scrape
    control = socket.socket(fileno=control_fd)
    frame = recv_frame(control, TRAINER_MESSAGE_LIMIT)
    if frame is None:
        return 0
    settings: dict[str, Any] = pickle.loads(frame)
    _lower_priority(settings["nice"])  # before any thread starts: they inherit it
    listener = socket.socket(fileno=listener_fd)
    web = WebConfig.from_portable(settings["web"]) if settings["web"] is not None else None
    try:
        context = web.tls.context() if web is not None and web.tls is not None else None
    except (OSError, ssl.SSLError) as exc:
        message = {"kind": "error", "message": f"cannot load the TLS certificate: {exc}"}
        send_frame(control, json.dumps(message).encode())
        return 1
    process = ServingProcess(listener, control, web, context, settings["max_connections"])
    send_frame(control, json.dumps({"kind": "ready", "pid": os.getpid()}).encode())
    process.run()
    return 0


def _lower_priority(nice: int) -> None:
    """This process at nice `nice` or lower priority: training wins the CPU when it is short."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))


class ServingProcess:
    """The event loop, the routes, a bcrypt thread, and the asks to the trainer."""

    def __init__(
        self,
        listener: socket.socket,
        control: socket.socket,
        web: WebConfig | None,
        context: ssl.SSLContext | None,
        max_connections: int,
    ) -> None:
        self._loop = ConnectionLoop(listener, self._on_request, max_connections=max_connections, ssl_context=context)
        self._control = control
        self._web = web
        self._extra = list(web.headers.items()) if web is not None else []
        self._exposition = routes.Exposition()
        self._pending: list[tuple[Connection, Request, float]] = []  # waiting for the trainer's state
        self._inbox = FrameBuffer(TRAINER_MESSAGE_LIMIT)
        self._asked_at: float | None = None
        self._next_ask = 0.0
        self._reported = -1
        self._parent = os.getppid()
        self._checked_parent = 0.0
        self._stop_by: float | None = None
        control.settimeout(5.0)  # sends block at most this long; reads happen only when readable
        self._loop.watch(control, self._on_control)
        self._checks: queue.SimpleQueue[tuple[Connection, Request] | None] = queue.SimpleQueue()
        self._checked: deque[tuple[Connection, Request, bool]] = deque()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._checker: threading.Thread | None = None
        if web is not None and web.users:  # the bcrypt thread wakes the loop through this pair when a check is done
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._loop.watch(self._wake_r, self._on_checked)
            self._checker = threading.Thread(target=self._check, name="tele-exporter:bcrypt", daemon=True)
            self._checker.start()

    def run(self) -> None:
        """Serve until told to stop (answers finish writing first) or until the trainer is gone."""
        try:
            self._loop.run(self._tick)
        finally:
            self._checks.put(None)

    # -- requests -----------------------------------------------------------------------

    def _on_request(self, conn: Connection, request: Request) -> None:
        response = routes.rate_limited(self._web)
        if response is None and self._web is not None:
            ok = self._web.cached_authorization(request.header("authorization"))
            if ok is None:  # a bcrypt check: on its own thread, one at a time; the loop goes on
                self._loop.requeue(conn)
                self._checks.put((conn, request))
                return
            response = None if ok else routes.unauthorized()
        self._route(conn, request, response)

    def _route(self, conn: Connection, request: Request, response: routes.Response | None) -> None:
        response = response or routes.static_response(request)
        if response is not None:
            self._send(conn, request, response)
            return
        self._loop.claim(conn)
        now = time.monotonic()
        if self._exposition.current(request, now) or self._stop_by is not None:
            self._answer(conn, request)
        else:
            self._pending.append((conn, request, now))
            self._ask(now)

    def _answer(self, conn: Connection, request: Request) -> None:
        response = self._exposition.answer(request)
        on_sent = None
        if request.method == "GET" and request.path == "/metrics" and response[0] == "200 OK":
            updates = self._exposition.updates
            on_sent = lambda: self._served(updates)  # noqa: E731
        self._send(conn, request, response, on_sent)

    def _send(self, conn: Connection, request: Request, response: routes.Response, on_sent: Any = None) -> None:
        status, headers, body = routes.finish(request, response, self._extra)
        self._loop.respond(conn, http_message(status, headers, body), on_sent)

    def _served(self, updates: int) -> None:
        """A GET /metrics carrying `updates` has been written out: close(linger=...) waits for this."""
        if updates > self._reported:
            self._reported = updates
            self._tell({"kind": "served", "updates": updates})

    # -- bcrypt, off the loop -----------------------------------------------------------

    def _check(self) -> None:
        assert self._web is not None
        while (item := self._checks.get()) is not None:
            conn, request = item
            if conn.closed:  # evicted or timed out while it waited: no check for nobody
                continue
            ok = self._web.check_authorization(request.header("authorization"))
            self._checked.append((conn, request, ok))
            try:
                assert self._wake_w is not None
                self._wake_w.send(b"\0")
            except OSError:
                pass  # the loop has a wakeup pending already

    def _on_checked(self) -> None:
        try:
            assert self._wake_r is not None
            self._wake_r.recv(4096)
        except OSError:
            pass
        while self._checked:
            conn, request, ok = self._checked.popleft()
            if not conn.closed:
                self._route(conn, request, None if ok else routes.unauthorized())

    # -- the trainer --------------------------------------------------------------------

    def _ask(self, now: float) -> None:
        if not self._pending or self._asked_at is not None or now < self._next_ask or self._stop_by is not None:
            return
        want_api = any(request.path == "/api/snapshot" for _, request, _ in self._pending)
        exposition = self._exposition
        self._tell({"kind": "ask", "have": exposition.version, "api": want_api, "have_api": exposition.api_version})
        self._asked_at = now

    def _tell(self, message: dict[str, Any]) -> None:
        try:
            send_frame(self._control, json.dumps(message).encode())
        except OSError:
            self._loop.stop()  # the trainer is gone

    def _on_control(self) -> None:
        try:
            data = self._control.recv(1 << 20)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError:
            data = b""
        if not data:
            self._loop.stop()  # the trainer is gone: nobody to serve
            return
        for frame in self._inbox.feed(data):
            message = pickle.loads(frame)
            if isinstance(message, Shipment):
                self._shipped(message)
            elif message == "stop":
                self._stop()

    def _shipped(self, shipment: Shipment) -> None:
        self._exposition.apply(shipment)
        now = time.monotonic()
        self._asked_at = None
        self._next_ask = now + min(max(ASK_INTERVAL, shipment.cost / TRAINER_SHARE), MAX_ASK_GAP)
        waiting, self._pending = self._pending, []
        for conn, request, arrived in waiting:
            if self._exposition.current(request, arrived):
                self._answer(conn, request)
            else:
                self._pending.append((conn, request, arrived))

    def _stop(self) -> None:
        """Stop accepting, answer what waits from what the trainer last gave, then finish writing."""
        self._stop_by = time.monotonic() + STOP_GRACE
        self._loop.stop_accepting()
        waiting, self._pending = self._pending, []
        for conn, request, _ in waiting:
            self._answer(conn, request)

    def _tick(self, now: float) -> float:
        wait = _PARENT_CHECK
        if now - self._checked_parent >= _PARENT_CHECK:
            self._checked_parent = now
            if os.getppid() != self._parent:
                self._loop.stop()  # the trainer died and we were handed to init
                return 0.0
        if self._stop_by is not None:
            if self._loop.writing == 0 or now >= self._stop_by:
                self._loop.stop()
            return min(0.05, max(self._stop_by - now, 0.0))
        if self._pending:
            oldest = self._pending[0][2]
            if self._asked_at is not None and now - oldest >= ASK_TIMEOUT:
                # The trainer is not answering: serve what it gave last (or 503) rather than hold scrapes.
                waiting, self._pending = self._pending, []
                for conn, request, _ in waiting:
                    self._answer(conn, request)
                return wait
            self._ask(now)
            if self._asked_at is None:
                wait = min(wait, max(self._next_ask - now, 0.0))
            wait = min(wait, max(oldest + ASK_TIMEOUT - now, 0.0))
        return wait
