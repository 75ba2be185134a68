"""HOST:PORT listen addresses of the command line, checked before any server sees them."""

from __future__ import annotations

import argparse


def listen_address(text: str) -> tuple[str, int]:
    """Parse HOST:PORT (IPv6 as [::1]:PORT, port 0-65535) for argparse."""
    host, sep, port_s = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (port 0-65535)")
    return host, int(port_s)


def server_address(text: str) -> str:
    """HOST:PORT with a real port (1-65535) for argparse, as a server's --web.listen-address takes it."""
    host, port = listen_address(text)
    if port == 0:
        raise argparse.ArgumentTypeError(f"{text!r} needs a fixed port (1-65535), not 0")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
