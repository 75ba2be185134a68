"""A /metrics endpoint serving fixed text, for boundary series a real Prometheus scrapes.

    with StaticExporter() as exporter:
        prometheus_config([exporter.address])
        exporter.text = exposition({"tele_kl_divergence": [({"rank": "0"}, 0.015)]})

Values are written with repr(), which Prometheus parses back to the same double, so a
series can sit exactly on a threshold or one float beside it.
"""

from __future__ import annotations

import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def sample(value: float) -> str:
    """A float as the text exposition format writes it, exactly."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def exposition(series: dict[str, list[tuple[dict[str, str], float]]]) -> str:
    """Gauge families {name: [(labels, value)]} in the Prometheus text format."""
    lines = []
    for name, rows in series.items():
        lines.append(f"# TYPE {name} gauge")
        for labels, value in rows:
            body = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{body}}} {sample(value)}")
    return "\n".join(lines) + "\n"


class StaticExporter:
    """Serves `text` (settable) at /metrics on 127.0.0.1 from a thread until closed."""

    def __init__(self, text: str = "") -> None:
        self.text = text
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.text.encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """host:port for a scrape config."""
        return f"127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StaticExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
