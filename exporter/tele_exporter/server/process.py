"""The serving process as the trainer sees it: start it on the bound socket, answer its asks, stop it.

The trainer keeps one thread (blocked on a socket pair) and one descriptor for it; it never
accepts a connection or writes an answer. The child runs this interpreter on this package's
server modules only: no torch, no telemetry layer, no copy of the trainer's memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from . import connections
from .handover import CHILD_MESSAGE_LIMIT, Feeder, recv_frame, send_frame
from .routes import Scrapes
from .source import SnapshotSource
from .web_config import WebConfig

START_TIMEOUT_SECONDS = 60.0  # a loaded machine can take seconds to start an interpreter
STOP_TIMEOUT_SECONDS = 5.0
_BOOT = "import sys; from tele_exporter.server.child import main; sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))"


class ServingChild:
    """A started serving process on `listener` (which it now holds; the caller may close its own copy)."""

    def __init__(
        self,
        listener: socket.socket,
        source: SnapshotSource,
        scrapes: Scrapes,
        web_config: WebConfig | None,
        max_connections: int,
    ) -> None:
        self._scrapes = scrapes
        self._feeder = Feeder(source)
        self._send_lock = threading.Lock()
        self._stopped = False
        ours, theirs = socket.socketpair()
        try:
            fds = (listener.fileno(), theirs.fileno())
            self._process = subprocess.Popen(
                [sys.executable, *_safe_path(), "-c", _BOOT, *map(str, fds)],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(_import_path())},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._channel = ours
        try:
            self._start(web_config, max_connections)
        except BaseException:
            self._kill()
            raise
        self._thread = threading.Thread(target=self._feed, name=f"tele-exporter:feed:{self.pid}", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        """The serving process's id."""
        return int(self._process.pid)

    @property
    def alive(self) -> bool:
        """True until stop(), or until the serving process has exited."""
        return not self._stopped and self._process.poll() is None

    @property
    def asks(self) -> int:
        """How many asks the trainer has answered: all the work serving has cost its interpreter."""
        return self._feeder.asks

    def stop(self) -> None:
        """Tell the serving process to finish its answers and exit; wait for it, kill it if it lingers. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(OSError):
            self._send(pickle.dumps("stop"))
        try:
            self._process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._kill()
        self._thread.join(STOP_TIMEOUT_SECONDS)
        self._channel.close()

    def _start(self, web_config: WebConfig | None, max_connections: int) -> None:
        settings = {
            "web": web_config.portable() if web_config is not None else None,
            "max_connections": max_connections,
            "nice": connections.SERVE_NICE,
        }
        self._channel.settimeout(START_TIMEOUT_SECONDS)
        try:
            self._send(pickle.dumps(settings))
            frame = recv_frame(self._channel, CHILD_MESSAGE_LIMIT)
        except TimeoutError:
            raise OSError(f"the serving process did not start within {START_TIMEOUT_SECONDS:g} s") from None
        except OSError:
            frame = None  # it exited before or while it read its settings
        self._channel.settimeout(None)
        if frame is None:
            status = self._process.wait()
            raise OSError(f"the serving process exited at start (status {status}); its error is above")
        message = _message(frame)
        if message.get("kind") != "ready":
            detail = message.get("message") or f"it exited with status {self._process.wait()}; see its error above"
            raise OSError(f"the serving process did not start: {detail}")

    def _feed(self) -> None:
        """Answer the serving process's asks until it exits: the only serving work done in the trainer.

        Not niced: the asks are paced, so this thread's share is bounded anyway, and on a
        saturated machine a niced thread here would add its wait to every scrape.
        """
        while True:
            try:
                message = _message(recv_frame(self._channel, CHILD_MESSAGE_LIMIT))
                if message.get("kind") == "ask":
                    have, api, have_api = int(message["have"]), bool(message["api"]), int(message["have_api"])
                    self._send(pickle.dumps(self._feeder.ship(have, api, have_api)))
                elif message.get("kind") == "served":
                    self._scrapes.served(int(message["updates"]))
            except (OSError, ValueError, KeyError, TypeError):
                return  # the serving process exited, or broke its protocol: nothing more to answer

    def _send(self, payload: bytes) -> None:
        with self._send_lock:
            send_frame(self._channel, payload)

    def _kill(self) -> None:
        with contextlib.suppress(OSError):
            self._process.kill()
        self._process.wait()
        self._channel.close()


def _message(frame: bytes | None) -> dict[str, Any]:
    """A message from the serving process: JSON, never pickle, so a subverted child cannot run code in the trainer."""
    if frame is None:
        raise OSError("the serving process closed its channel")
    message = json.loads(frame)
    if not isinstance(message, dict):
        raise ValueError("a message from the serving process is not an object")
    return message


def _import_path() -> list[str]:
    """This package's root first, then the trainer's own sys.path, so the child imports the same modules."""
    root = str(Path(__file__).resolve().parents[2])
    return [root, *(p for p in sys.path if p and p != root)]


def _safe_path() -> list[str]:
    """-P (Python 3.11+): keep the working directory off the child's path, where a stray file could shadow a module."""
    return ["-P"] if sys.version_info >= (3, 11) else []
