"""`tele-exporter stack`: a local Prometheus and Alertmanager with the repository's configs.

For users without Docker: runs Debian's (or any) `prometheus` and Alertmanager
binaries on this machine with prometheus/prometheus.yml, the generated rules and
prometheus/alertmanager.yml, data in a temporary directory, until Ctrl-C.
Start a trainer (`tele-exporter demo --fault kl`) and watch the alerts fire.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import FrameType

from .server.addresses import server_address

PROMETHEUS_NAMES = ("prometheus",)
ALERTMANAGER_NAMES = ("prometheus-alertmanager", "alertmanager")
INSTALL_HINT = (
    "install them with `apt-get install -y --no-install-recommends prometheus "
    "prometheus-alertmanager`, or put the upstream binaries on PATH"
)
READY_TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The stack's flags."""
    parser.add_argument(
        "--config-dir",
        default=None,
        help="directory holding prometheus.yml, alertmanager.yml and rules/ "
        "(default: prometheus/ of the checkout containing the current directory)",
    )
    parser.add_argument(
        "--prometheus-address",
        type=server_address,
        default="127.0.0.1:9090",
        metavar="HOST:PORT",
        help="Prometheus listen address (default: %(default)s)",
    )
    parser.add_argument(
        "--alertmanager-address",
        type=server_address,
        default="127.0.0.1:9093",
        metavar="HOST:PORT",
        help="Alertmanager listen address; prometheus.yml sends alerts to 127.0.0.1:9093 (default: %(default)s)",
    )


def find_binary(names: tuple[str, ...]) -> str | None:
    """The first of `names` found on PATH."""
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def find_config_dir(start: Path) -> Path | None:
    """prometheus/ with prometheus.yml in `start` or a parent directory."""
    for candidate in (start, *start.parents):
        if (candidate / "prometheus" / "prometheus.yml").is_file():
            return candidate / "prometheus"
    return None


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> bool:
    """Poll url/-/ready until it answers 200, the process dies or the timeout passes."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(args: argparse.Namespace) -> int:
    """Start Alertmanager and Prometheus, print their URLs, run until Ctrl-C; exit status."""
    prometheus = find_binary(PROMETHEUS_NAMES)
    alertmanager = find_binary(ALERTMANAGER_NAMES)
    missing = [n for n, b in (("prometheus", prometheus), ("alertmanager", alertmanager)) if b is None]
    if prometheus is None or alertmanager is None:
        print(f"tele-exporter stack: {' and '.join(missing)} not found on PATH; {INSTALL_HINT}", file=sys.stderr)
        return 2
    config_dir = Path(args.config_dir) if args.config_dir else find_config_dir(Path.cwd().resolve())
    if config_dir is None or not (config_dir / "prometheus.yml").is_file():
        print(
            "tele-exporter stack: no prometheus/prometheus.yml here or above; run it in the "
            "tele-exporter checkout or pass --config-dir",
            file=sys.stderr,
        )
        return 2
    config_dir = config_dir.resolve()
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    with tempfile.TemporaryDirectory(prefix="tele-stack-") as tmp:
        data = Path(tmp)
        commands = {
            "alertmanager": [
                alertmanager,
                f"--config.file={config_dir / 'alertmanager.yml'}",
                f"--storage.path={data / 'alertmanager'}",
                f"--web.listen-address={args.alertmanager_address}",
                "--cluster.listen-address=",
            ],
            "prometheus": [
                prometheus,
                f"--config.file={config_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={data / 'prometheus'}",
                f"--web.listen-address={args.prometheus_address}",
                "--web.enable-lifecycle",
            ],
        }
        addresses = {"alertmanager": args.alertmanager_address, "prometheus": args.prometheus_address}
        processes: list[subprocess.Popen[bytes]] = []
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for name, argv in commands.items():
                log = (data / f"{name}.log").open("wb")
                process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=config_dir)
                processes.append(process)
                url = f"http://{addresses[name]}"
                if not _wait_ready(url, process):
                    print(f"tele-exporter stack: {name} did not start:", file=sys.stderr)
                    print((data / f"{name}.log").read_text(errors="replace"), file=sys.stderr)
                    return 1
                print(f"{name}: {url} (log: {data / f'{name}.log'})", flush=True)
            print(
                "scraping the trainer as prometheus.yml says (127.0.0.1:9842: run "
                "`tele-exporter demo --fault kl` beside it); alerts: "
                f"http://{args.prometheus_address}/alerts; Ctrl-C stops",
                flush=True,
            )
            while not stop:
                for name, process in zip(commands, processes, strict=True):
                    if process.poll() is not None:
                        print(f"tele-exporter stack: {name} exited with {process.returncode}", file=sys.stderr)
                        return 1
                time.sleep(0.5)
            return 0
        finally:
            _stop(processes)
            for sig, handler in old.items():
                signal.signal(sig, handler)
