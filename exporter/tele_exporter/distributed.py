"""Many processes: every rank serves its own /metrics on base port + LOCAL_RANK.

Under `torchrun`, each rank's Telemetry carries a `rank` const label (the global
rank, added when torch.distributed is initialised with world size > 1) and
`serve_rank` listens on `base_port + LOCAL_RANK`, so ranks on one host never
collide. Prometheus scrapes every rank (see `file_sd_targets`) and aggregates
across ranks with recording rules; nothing is reduced in the training process,
so telemetry adds no collective to the training step.

`python -m tele_exporter.distributed file-sd --hosts h1,h2 --nproc 8 --base-port 9842 --job NAME`
prints a Prometheus file_sd target list for every rank of every host. Several jobs on
one host need base ports at least --nproc apart; a rank whose port is taken fails at
`serve_rank` with an error naming the port and, when it is a tele-exporter, its job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .catalog.model import default_catalog
from .server.http import DEFAULT_ADDR, DEFAULT_PORT, PortInUseError, Server, serve
from .telemetry.launch import env_int
from .telemetry.telemetry import Telemetry

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
    """Serve this rank's telemetry on base_port + LOCAL_RANK; a taken port names its holder."""
    port = rank_port(base_port)
    try:
        return serve(tele, port, addr)
    except PortInUseError as exc:
        raise PortInUseError(exc.errno, _port_taken(tele, base_port, port, addr)) from None


def _port_taken(tele: Telemetry, base_port: int, port: int, addr: str) -> str:
    """Why this rank cannot listen: the port, who holds it, and how to give each job its own range."""
    label = tele.catalog.job_label
    mine = tele.const_labels.get(label) if label else None
    nproc = env_int("LOCAL_WORLD_SIZE", os.environ, 1) or 1
    return (
        f"{'training job ' + repr(mine) if mine else 'this job'}: cannot serve on {addr}:{port} "
        f"(base port {base_port} + LOCAL_RANK {port - base_port}): the port is taken by {_holder(addr, port)}. "
        f"Each job on a host needs its own port range of LOCAL_WORLD_SIZE ports ({base_port}..{base_port + nproc - 1} "
        "for this one): start it with a base port outside every other job's range."
    )


def _holder(addr: str, port: int) -> str:
    """The tele-exporter job and rank serving on addr:port, read from its /metrics, else 'another process'."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(addr, addr)
    shown = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{shown}:{port}/metrics", timeout=2) as response:
            text = response.read(1 << 20).decode("utf-8", "replace")
        families = list(text_string_to_metric_families(text))
    except (OSError, ValueError):
        return "another process"
    labels = next((s.labels for f in families for s in f.samples if s.name == "tele_world_size"), None)
    if labels is None:
        return "another process"
    named = ", ".join(f"{k}={v!r}" for k, v in sorted(labels.items()))
    return f"another tele-exporter ({named})" if named else "another tele-exporter"


def job_target_labels(job: str | None) -> dict[str, str]:
    """The per-job label (the catalog's job_label) for a job name; {} for None."""
    if job is None:
        return {}
    label = default_catalog().job_label
    if not label:
        raise ValueError("the catalog has no job_label to carry a job name")
    if not job:
        raise ValueError("empty job name")
    return {label: job}


def file_sd_targets(
    hosts: Sequence[str],
    nproc: int,
    base_port: int = DEFAULT_PORT,
    labels: Mapping[str, str] | None = None,
    job: str | None = None,
) -> list[dict[str, Any]]:
    """Prometheus file_sd target groups: one group per host, one target per local rank.

    `job` sets the catalog's job_label (training_job) on every target; give every
    rank of the job the same value in Telemetry(const_labels=...).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if not (base_port > 0 and base_port + nproc - 1 <= MAX_PORT):
        raise ValueError(f"ports {base_port}..{base_port + nproc - 1} are outside 1..{MAX_PORT}")
    extra = dict(labels or {})
    for key, value in job_target_labels(job).items():
        if extra.setdefault(key, value) != value:
            raise ValueError(f"label {key}={extra[key]!r} contradicts job {value!r}")
    groups = []
    for host in hosts:
        if not host:
            raise ValueError("empty host name")
        shown = f"[{host}]" if ":" in host else host
        groups.append(
            {
                "targets": [f"{shown}:{base_port + r}" for r in range(nproc)],
                "labels": {"node": host, **extra},
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
    sd.add_argument("--job", default=None, help="the training job's name, set as the catalog's job_label")
    args = parser.parse_args(argv)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    try:
        groups = file_sd_targets(hosts, args.nproc, args.base_port, dict(args.label), args.job)
    except ValueError as exc:
        parser.error(str(exc))
    json.dump(groups, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
