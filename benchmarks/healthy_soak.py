"""Soak the healthy demo against a real Prometheus with the generated alert rules.

Starts `tele-exporter demo --updates 0` (no fault) and Debian's `prometheus` with
prometheus/prometheus.yml's intervals and every rule file it names, on free
ports, then polls Prometheus' alerts for `--minutes`. Prints every alert that
went pending or fired, and the extremes of the TELE signals over the run.
Exit status 1 when any alert fired.

    python benchmarks/healthy_soak.py --minutes 30
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "prometheus"
LISTEN = "127.0.0.1:0"
URL = re.compile(r"(https?://\S+)/metrics")
EXTREMES = {
    "max KL": 'max_over_time(tele_kl_divergence{job="tele"}[{w}])',
    "min pre-clip norm": 'min_over_time(tele_policy_grad_norm{job="tele", clip="pre"}[{w}])',
    "max pre-clip norm": 'max_over_time(tele_policy_grad_norm{job="tele", clip="pre"}[{w}])',
    "max CV": 'max_over_time(tele_gradient_cv{job="tele"}[{w}])',
    "min policy entropy": 'min_over_time(tele_policy_entropy{job="tele"}[{w}])',
    "min head entropy (normalised)": 'min(min_over_time(tele_head_entropy_normalized{job="tele"}[{w}]))',
    "min explained variance": 'min_over_time(tele_explained_variance{job="tele"}[{w}])',
    "max clip fraction": 'max_over_time(tele_ppo_clip_fraction{job="tele"}[{w}])',
    "max head ratio max": 'max(max_over_time(tele_head_ratio_max{job="tele"}[{w}]))',
    "min advantage std": 'min_over_time(tele_advantage_std{job="tele"}[{w}])',
    "max seed ratio": 'max(max_over_time(tele_seed_grad_ratio{job="tele"}[{w}]))',
    "updates": 'max_over_time(tele_ppo_updates_total{job="tele"}[{w}])',
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def query(prom: str, promql: str) -> list[dict[str, Any]]:
    body = get_json(f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    return list(body["data"]["result"])


def wait_for(check: Any, timeout: float, what: str) -> Any:
    """Poll `check` until truthy; exit with a message after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
            if found:
                return found
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"soak: {what} not ready within {timeout:.0f} s")


def prometheus_config(target: str) -> dict[str, Any]:
    """prometheus.yml as shipped, scraping `target` as job tele, rules by absolute path, no Alertmanager."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    config.pop("alerting", None)
    for job in config["scrape_configs"]:
        if job["job_name"] == "tele":
            job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [j for j in config["scrape_configs"] if j["job_name"] == "tele"]
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to soak (default: %(default)s)")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between alert polls (default: %(default)s)")
    parser.add_argument("--log", default=None, help="file for the demo's output (default: a temp file)")
    args = parser.parse_args()
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        sys.exit("soak: needs Debian's prometheus on PATH (apt-get install prometheus)")
    with tempfile.TemporaryDirectory(prefix="tele-soak-") as tmp:
        work = Path(tmp)
        log_path = Path(args.log) if args.log else work / "demo.log"
        demo_log = log_path.open("w", encoding="utf-8")
        demo = subprocess.Popen(
            [sys.executable, "-m", "tele_exporter.cli", "demo", "--updates", "0", "--web.listen-address", LISTEN],
            stdout=demo_log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        processes = [demo]
        try:
            match = wait_for(lambda: URL.search(log_path.read_text(encoding="utf-8")), 120, "the demo")
            target = urllib.parse.urlsplit(match.group(1)).netloc
            port = free_port()
            config = work / "prometheus.yml"
            config.write_text(yaml.safe_dump(prometheus_config(target)), encoding="utf-8")
            prom_log = (work / "prometheus.log").open("wb")
            processes.append(
                subprocess.Popen(
                    [
                        prometheus,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={work / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=prom_log,
                    stderr=subprocess.STDOUT,
                )
            )
            prom = f"http://127.0.0.1:{port}"
            wait_for(lambda: query(prom, 'up{job="tele"} == 1'), 120, "the first scrape")
            print(f"soak: demo at {match.group(1)}/, Prometheus at {prom}, {args.minutes:g} min", flush=True)
            seen: dict[tuple[str, str, str], dict[str, Any]] = {}
            start = time.monotonic()
            while time.monotonic() - start < args.minutes * 60:
                if demo.poll() is not None:
                    sys.exit(f"soak: the demo exited with {demo.returncode}; see {log_path}")
                for alert in get_json(f"{prom}/api/v1/alerts")["data"]["alerts"]:
                    labels = alert["labels"]
                    key = (labels["alertname"], labels.get("severity", ""), alert["state"])
                    if key not in seen:
                        minute = (time.monotonic() - start) / 60
                        seen[key] = {"minute": minute, "value": alert.get("value")}
                        print(f"soak: {minute:5.1f} min  {key[0]} {key[1]} {key[2]} (value {alert.get('value')})")
                time.sleep(args.poll)
            window = f"{max(1, round(args.minutes * 60))}s"
            print(f"soak: finished {args.minutes:g} min; demo output in {log_path}")
            for name, promql in EXTREMES.items():
                result = query(prom, promql.replace("{w}", window))
                value = float(result[0]["value"][1]) if result else float("nan")
                print(f"soak: {name}: {value:.4g}")
            pending = sorted({f"{a} ({s})" for a, s, state in seen if state == "pending"})
            fired = sorted({f"{a} ({s})" for a, s, state in seen if state == "firing"})
            print(f"soak: alerts that went pending: {', '.join(pending) or 'none'}")
            print(f"soak: alerts that fired: {', '.join(fired) or 'none'}")
            return 1 if fired else 0
        finally:
            for process in reversed(processes):
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


if __name__ == "__main__":
    sys.exit(main())
