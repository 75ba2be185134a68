"""Many processes: every rank serves its own /metrics on base port + LOCAL_RANK.

Under `torchrun`, each rank's Telemetry carries a `rank` const label (the global
rank, added when torch.distributed is initialised with world size > 1) and
`serve_rank` listens on `base_port + LOCAL_RANK`, so ranks on one host never
collide. Prometheus scrapes every rank (see `file_sd_targets`) and aggregates
across ranks with recording rules; nothing is reduced in the training process,
so telemetry adds no collective to the training step.

`python -m tele_exporter.distributed file-sd --hosts h1,h2 --nproc 8 --base-port 9842`
prints a Prometheus file_sd target list for every rank of every host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .launch import env_int
from .server import DEFAULT_ADDR, DEFAULT_PORT, Server, serve
from .telemetry import Telemetry

MAX_PORT = 65535


def local_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank on its host: LOCAL_RANK as torchrun sets it, 0 when unset."""
    return env_int("LOCAL_RANK", os.environ if environ is None else environ, 0) or 0


def rank_port(base_port: int, environ: Mapping[str, str] | None = None) -> int:
    """The port this rank serves on: base_port + LOCAL_RANK (base_port 0 stays 0: any free port)."""
    if base_port == 0:
        return 0
    port = base_port + local_rank(environ)
    if not 0 < port <= MAX_PORT:
        raise ValueError(f"base port {base_port} + LOCAL_RANK is {port}, outside 1..{MAX_PORT}")
    return port


def serve_rank(tele: Telemetry, base_port: int = DEFAULT_PORT, addr: str = DEFAULT_ADDR) -> Server:
    """Serve this rank's telemetry on base_port + LOCAL_RANK."""
    return serve(tele, rank_port(base_port), addr)


def file_sd_targets(
    hosts: Sequence[str], nproc: int, base_port: int = DEFAULT_PORT, labels: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Prometheus file_sd target groups: one group per host, one target per local rank."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if not (base_port > 0 and base_port + nproc - 1 <= MAX_PORT):
        raise ValueError(f"ports {base_port}..{base_port + nproc - 1} are outside 1..{MAX_PORT}")
    groups = []
    for host in hosts:
        if not host:
            raise ValueError("empty host name")
        shown = f"[{host}]" if ":" in host else host
        groups.append(
            {
                "targets": [f"{shown}:{base_port + r}" for r in range(nproc)],
                "labels": {"node": host, **dict(labels or {})},
            }
        )
    return groups


def _label(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tele_exporter.distributed file-sd ...`: print file_sd JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m tele_exporter.distributed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sd = sub.add_parser("file-sd", help="print a Prometheus file_sd target list for every rank")
    sd.add_argument("--hosts", required=True, help="comma-separated host names, one per node")
    sd.add_argument("--nproc", type=int, required=True, help="ranks per node (torchrun --nproc-per-node)")
    sd.add_argument("--base-port", type=int, default=DEFAULT_PORT, help="the port of LOCAL_RANK 0")
    sd.add_argument("--label", type=_label, action="append", default=[], help="extra target label NAME=VALUE")
    args = parser.parse_args(argv)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    try:
        groups = file_sd_targets(hosts, args.nproc, args.base_port, dict(args.label))
    except ValueError as exc:
        parser.error(str(exc))
    json.dump(groups, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
