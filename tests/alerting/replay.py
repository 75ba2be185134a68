"""Replay a recorded run (scripts/record_alert_runs.py) through the generated rules with promtool.

The timeline is a realistic one: Prometheus scrapes every 15 s and the trainer publishes one
PPO update every 30 s, so each recorded scrape is seen twice. Every rule file Prometheus loads
is loaded (alerts, recording and rank rules), and a run of several ranks (RLlib's learner
actors) has one target per rank, as file_sd gives them. A clean end lingers for two
scrapes that carry tele_run_finished 1, then the target goes away; a crash stops at the last
update and leaves the target down (up 0). Which alerts fired, and when, is read back from
promtool's ALERTS series.

    python -m tests.alerting.replay    # the run x alert matrix of docs/alerting.md
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).with_name("fixtures")
RULES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
SCRAPE_S, UPDATE_S = 15, 30
AFTER_END_S = 40 * 60  # how long the replay goes on after the run ends
JOB, PORT = "tele", 9842  # a series with rank="i" is scraped from instance trainer:9842+i
# Firing ALERTS: the first time each alert (name, severity) fired, at any time up to the evaluation.
FIRST_FIRING = 'min by (alertname, severity) (min_over_time(timestamp(ALERTS{{alertstate="firing"}})[{h}s:{s}s]))'


@dataclass(frozen=True)
class Run:
    """A recorded run: its scrapes and the fault, if any."""

    name: str
    library: str
    fault: str | None
    fault_update: int | None
    series: dict[str, list[Any]]
    updates: int
    crashed: str | None = None  # the exception that killed the trainer: it never finished

    @classmethod
    def load(cls, path: Path) -> Run:
        data = json.loads(path.read_text())
        return cls(
            data["run"],
            data["library"],
            data["fault"],
            data["fault_update"],
            data["series"],
            data["updates"],
            data.get("crashed"),
        )

    @property
    def fault_time(self) -> int | None:
        """When the first faulted update was published (seconds on the replay's clock)."""
        return None if self.fault_update is None else self.published(self.fault_update)

    def published(self, update: int) -> int:
        return UPDATE_S * (update + 1)

    @property
    def end(self) -> int:
        return self.published(self.updates - 1)


def _series_name(key: str) -> tuple[str, dict[str, str]]:
    name, _, rest = key.partition("{")
    labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
    return name, labels


def _target(labels: dict[str, str]) -> dict[str, str]:
    """The job and instance Prometheus adds: one target per rank."""
    return {"job": JOB, "instance": f"trainer:{PORT + int(labels.get('rank') or 0)}"}


def _selector(name: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted({**labels, **_target(labels)}.items()))
    return f"{name}{{{inner}}}"


def _value(v: Any) -> str:
    return "_" if v is None else str(v)


def input_series(run: Run, crash: bool = False) -> list[dict[str, str]]:
    """promtool input_series on a 15 s grid: each update's scrape twice, then the end (clean or a crash).

    A run that died (`run.crashed`) ends as a crash at its last scrape; a healthy run replayed
    as a crash loses its final, finished scrape.
    """
    out = []
    instances: set[str] = set()
    died = bool(run.crashed)
    crash = crash or died
    end = run.updates if died else (run.updates - 1 if crash else run.updates)
    for key, values in run.series.items():
        name, labels = _series_name(key)
        instances.add(_target(labels)["instance"])
        if name == "tele_last_update_timestamp_seconds":  # the replay's clock, not the recording's
            values = [None if v is None else run.published(i) for i, v in enumerate(values)]
        grid = ["_", "_"]  # before the first update
        for v in values[:end]:
            grid += [_value(v)] * (UPDATE_S // SCRAPE_S)
        if not crash:
            grid += [_value(values[end - 1])] * 2  # the linger: the finished scrape is scraped
        grid.append("stale")  # the exporter is gone
        out.append({"series": _selector(name, labels), "values": " ".join(grid)})
    n = 2 + (UPDATE_S // SCRAPE_S) * end + (0 if crash else 2)
    up = ["1"] * n + (["0"] * (AFTER_END_S // SCRAPE_S) if crash else ["stale"])
    for instance in sorted(instances):  # one target per rank
        out.append({"series": f'up{{instance="{instance}", job="{JOB}"}}', "values": " ".join(up)})
    return out


def promtool_test(run: Run, checks: list[tuple[str, int, list[dict[str, Any]]]], crash: bool = False) -> str:
    """A promtool test file: the run's series and `checks` as (expr, eval seconds, expected samples)."""
    test = {
        "rule_files": [str(path) for path in RULES],
        "evaluation_interval": f"{SCRAPE_S}s",
        "tests": [
            {
                "name": run.name + (" (crashed)" if crash else ""),
                "interval": f"{SCRAPE_S}s",
                "input_series": input_series(run, crash),
                "promql_expr_test": [
                    {"expr": expr, "eval_time": f"{at}s", "exp_samples": exp} for expr, at, exp in checks
                ],
            }
        ],
    }
    return yaml.safe_dump(test, sort_keys=False, width=1000)


def run_promtool(text: str, promtool: str = "promtool") -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "replay.yml"
        path.write_text(text)
        return subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=600)


def first_firings(run: Run, crash: bool = False, promtool: str = "promtool") -> dict[tuple[str, str], float]:
    """Each alert's first firing (seconds on the replay's clock), read from promtool's report of ALERTS."""
    horizon = run.end + AFTER_END_S
    expr = FIRST_FIRING.format(h=horizon, s=SCRAPE_S)
    result = run_promtool(promtool_test(run, [(expr, horizon, [])], crash), promtool)
    if result.returncode == 0:
        return {}
    got = re.search(r"got: (.*)", result.stdout + result.stderr)
    if got is None:
        raise RuntimeError(f"promtool failed without a result:\n{result.stdout}\n{result.stderr}")
    return {
        (name, severity): float(value)
        for name, severity, value in re.findall(r'\{alertname="(\w+)", severity="(\w+)"\} ([0-9.E+-]+)', got.group(1))
    }


def runs() -> list[Run]:
    return [Run.load(p) for p in sorted(FIXTURES.glob("*.json"))]


def matrix() -> str:
    """The run x alert table of docs/alerting.md: the minute each alert first fired (after the fault, if any)."""
    lines = ["| run | fault (from update) | alerts fired (minute after the fault, or of the run) |", "|---|---|---|"]
    for run in runs():
        fired = first_firings(run)
        start = run.fault_time or 0
        cells = ", ".join(
            f"{name} {sev} {(t - start) / 60:+.1f}" for (name, sev), t in sorted(fired.items(), key=lambda kv: kv[1])
        )
        fault = f"{run.fault} ({run.fault_update})" if run.fault else "healthy"
        if run.crashed:
            fault += f"; the trainer died: {run.crashed[:60]}"
        lines.append(f"| {run.name} ({run.library}, {run.updates} updates) | {fault} | {cells or 'none'} |")
        if run.fault is None:
            crashed = first_firings(run, crash=True)
            cells = ", ".join(f"{n} {s} {(t - run.end) / 60:+.1f}" for (n, s), t in sorted(crashed.items()))
            lines.append(f"| {run.name}, killed after its last update | crash | {cells or 'none'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(matrix())
