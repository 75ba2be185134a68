"""Run `tele-exporter demo` as a subprocess for tests, with timestamped output.

    with start_demo("--fault", "kl", "--fault-after", "3") as demo:
        demo.address              # "127.0.0.1:PORT" for a Prometheus scrape config
        demo.wait_update(5, 60)   # time.time() at which update 5 was printed

The demo listens on a free port (it is started with port 0 and prints its URL).
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from .processes import stop_process

_URL = re.compile(r"(https?://\S+/metrics)")
_UPDATE = re.compile(r"^update (\d+)/")
START_TIMEOUT_S = 120.0


@dataclass
class Demo:
    """A running demo process; stop() terminates it by PID."""

    process: subprocess.Popen[str]
    url: str = ""
    lines: list[tuple[float, str]] = field(default_factory=list)
    updates: dict[int, float] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def address(self) -> str:
        """host:port of /metrics."""
        return urllib.parse.urlsplit(self.url).netloc

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            now = time.time()
            with self._cond:
                self.lines.append((now, line.rstrip("\n")))
                match = _UPDATE.match(line)
                if match:
                    self.updates[int(match.group(1))] = now
                url = _URL.search(line)
                if url and not self.url:
                    self.url = url.group(1)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not ready():
                if self.process.poll() is not None:
                    raise RuntimeError(f"demo exited ({self.process.returncode}) before {what}:\n{self.output()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"demo: no {what} within {timeout:.0f}s:\n{self.output()}")
                self._cond.wait(min(left, 1.0))

    def wait_update(self, n: int, timeout: float) -> float:
        """time.time() at which update n was printed (waits for it)."""
        self._wait(lambda: n in self.updates, timeout, f"update {n}")
        return self.updates[n]

    def rate(self) -> float:
        """Updates per second so far (from the second printed update on)."""
        with self._cond:
            times = sorted(self.updates.values())
        if len(times) < 3:
            return 0.0
        return (len(times) - 2) / (times[-1] - times[1])

    def output(self) -> str:
        """Everything printed so far."""
        with self._cond:
            return "\n".join(text for _, text in self.lines[-40:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15s."""
        stop_process(self.process, grace_s=15.0)

    def __enter__(self) -> Demo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_demo(*args: str, host: str = "127.0.0.1") -> Demo:
    """Start `tele-exporter demo --updates 0 --web.listen-address HOST:0 *args`; waits for its URL."""
    argv = [
        sys.executable,
        "-m",
        "tele_exporter.cli",
        "demo",
        "--updates",
        "0",
        "--web.listen-address",
        f"{host}:0",
        *args,
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    demo = Demo(process)
    threading.Thread(target=demo._read, daemon=True).start()
    try:
        demo._wait(lambda: bool(demo.url), START_TIMEOUT_S, "metrics URL")
    except BaseException:
        demo.stop()
        raise
    return demo
