"""README: its metric table matches the catalog, CI runs the test command it gives, and its PPO-loop snippets run.

The snippets of "Instrument your own PPO loop" run as written against a real
tiny torch actor-critic and rollouts this file supplies (the README's "your
code"); what they serve is scraped and checked against a float64 k3 of the
log-ratios the loop saw, and the parallel-runs snippet is found by a real
Prometheus through the README's file_sd config.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torch.distributions import Categorical

from tele_exporter import Telemetry
from tele_exporter.catalog import default_catalog
from tele_exporter.catalog.thresholds import movable, signals

from .support.scraper import Scraper
from .support.servers import poll, start_prometheus

ROOT = Path(__file__).resolve().parents[1]


def test_metric_table_matches_the_catalog() -> None:
    rows = re.findall(r"^\| `(tele_\w+)` \| (\w+) \|\s*([\w, ]*?)\s*\|", (ROOT / "README.md").read_text(), re.M)
    table = {name: (kind, tuple(x.strip() for x in labels.split(",") if x.strip())) for name, kind, labels in rows}
    catalog = {spec.name: (spec.type, spec.labels) for spec in default_catalog()}
    assert table == catalog


def test_thresholds_signals_list_every_movable_level() -> None:
    """The README's list of what a run may move is thresholds.signals() and movable(), level for level."""
    text = (ROOT / "README.md").read_text()
    bullet = re.search(r"^\* Signals, each with the levels a run may move: (.+?)\.\n  An unknown", text, re.M | re.S)
    assert bullet is not None
    listed: dict[str, tuple[str, ...]] = {}
    for names, levels in re.findall(r"((?:`\w+`(?:, | and )?)+) \(([\w, ]+)\)", " ".join(bullet.group(1).split())):
        for name in re.findall(r"`(\w+)`", names):
            listed[name] = tuple(level.strip() for level in levels.split(","))
    catalog = default_catalog()
    assert listed == {spec.id: tuple(lv.name for lv in movable(spec)) for spec in signals(catalog)}


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(make test)\b", readme, re.M)
    assert command is not None
    assert command.group(1) in (ROOT / ".ci" / "run").read_text()


def test_readme_documents_the_fast_tier_as_the_makefile_runs_it() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    markers = re.search(r"^FAST_MARKERS := (.+)$", makefile, re.M)
    assert markers is not None and markers.group(1) == "not servers and not browser"
    assert f'`pytest -m "{markers.group(1)}"`' in readme
    recipe = r"^test-fast: .*\n\t\$\(RUN_IN_ENV\) \$\(PY\) -m pytest [^\n]*-m \"\$\(FAST_MARKERS\)\""
    assert re.search(recipe, makefile, re.M)


def test_docker_compose_commands_are_compose_v2() -> None:
    """`docker compose` (v2), never Compose v1's `docker-compose`, which fails on current engines."""
    for path in (ROOT / "README.md", ROOT / "docs" / "grafana.md"):
        commands = re.findall(r"^(docker[ -]compose) ", path.read_text(), re.M)
        assert commands and set(commands) == {"docker compose"}, (path.name, commands)


# -- the README's numbers, pinned to the code and the catalog ------------------------------------------


def test_readme_max_connections_is_serves_default() -> None:
    from tele_exporter.server.http import DEFAULT_MAX_CONNECTIONS

    said = re.findall(r"max_connections=(\d+)", (ROOT / "README.md").read_text())
    assert said and {int(n) for n in said} == {DEFAULT_MAX_CONNECTIONS}


def test_readme_lists_every_fault_mode() -> None:
    from tele_exporter.demo.faults import FAULTS

    (modes,) = re.findall(r"`--fault ((?:[a-z]+\|)+[a-z]+)`", (ROOT / "README.md").read_text())
    assert modes.split("|") == [f for f in FAULTS if f != "none"]


def _alert_rows() -> dict[str, str]:
    """Each alert name in the README's alert table -> the text of its row."""
    readme = (ROOT / "README.md").read_text()
    rows = {}
    for line in re.findall(r"^\| `Tele.*\|$", readme, re.M):
        names, _, text = line.strip("|").partition("|")
        for name in re.findall(r"`(Tele\w+)`", names):
            rows[name] = text
    return rows


def _catalog_alerts() -> set[tuple[str, str, str]]:
    """(alert, severity, for) of every alert the catalog defines, level alerts and the others."""
    out = set()
    for spec in default_catalog():
        for level in spec.levels:
            if level.alert is not None:
                out.add((level.alert.name, level.alert.severity, level.alert.for_))
        for alert in getattr(spec, "alerts", ()):
            out.add((alert.name, alert.severity, alert.for_))
    return out


def test_alert_table_names_every_alert_with_its_for_and_severity() -> None:
    """Every alert of the catalog has a row, and each of its `for:` durations stands beside its severity."""
    rows = _alert_rows()
    problems = []
    for name, severity, held in sorted(_catalog_alerts()):
        row = rows.get(name)
        if row is None:
            problems.append(f"{name}: no row")
            continue
        if f"({severity})" not in row:
            problems.append(f"{name}: no ({severity}) in {row!r}")
        n, unit = re.fullmatch(r"(\d+)([smh])", held).groups()  # type: ignore[union-attr]
        if int(n) and not re.search(rf"for {n} ?{unit}\b[^;|]*?\({severity}\)", row):
            problems.append(f"{name}: no 'for {n} {unit} ... ({severity})' in {row!r}")
    assert problems == []


# -- the first hour: every command the README shows runs as written, on a fresh clone --------------


def _readme_commands() -> list[str]:
    """The command lines of the README's shell blocks (comments stripped)."""
    readme = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"^```sh\n(.*?)^```$", readme, re.M | re.S):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command:
                lines.append(command)
    return lines


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `git clone` of this checkout's HEAD: only what a newcomer gets."""
    clone = tmp_path_factory.mktemp("clone") / "tele-exporter"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    return clone


def test_readme_says_once_where_make_puts_the_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count("make installs into the virtualenv `.venv`") == 1
    assert "`.venv/bin/tele-exporter`" in readme
    for command in _readme_commands():
        assert not command.startswith("tele-exporter "), f"{command!r} is not on PATH after make demo"


def test_every_readme_make_command_is_a_target_of_the_fresh_clone(fresh_clone: Path) -> None:
    commands = [c for c in _readme_commands() if c.startswith("make ")]
    assert {c.split()[1] for c in commands} >= {"demo", "test", "stack", "generate", "test-fast"}
    for command in commands:
        run = subprocess.run(
            [*command.split(), "-n"], cwd=fresh_clone, capture_output=True, text=True, timeout=60
        )  # -n: print what make would run, run nothing
        assert run.returncode == 0, (command, run.stderr)


def test_every_readme_tele_exporter_command_parses(fresh_clone: Path) -> None:
    from tele_exporter.cli import build_parser

    commands = [c for c in _readme_commands() if c.startswith(".venv/bin/tele-exporter ")]
    assert commands
    for command in commands:
        argv = command.split()[1:]
        build_parser(argv[0]).parse_args(argv)  # SystemExit on an unknown subcommand or flag


def test_readme_pip_extras_exist() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    text = (ROOT / "README.md").read_text()
    named = {e for group in re.findall(r'-e "\.\[([\w,]+)\]"', text) for e in group.split(",")}
    assert named and named <= set(extras), named - set(extras)


@pytest.mark.slow
def test_make_generate_works_on_a_fresh_clone(fresh_clone: Path, tmp_path: Path) -> None:
    """`make generate` installs the grafana extra before it generates, and leaves a fresh clone unchanged.

    It runs in a stand-in virtualenv whose pip only records what it was asked for (nothing is
    installed, nothing leaves this machine) and whose tele-exporter is this package, run from
    the clone's own sources.
    """
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    asked = tmp_path / "pip-asked"
    python = venv / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2" = "-m pip" ]; then echo "$@" >> {asked}; exit 0; fi\n'
        f'PYTHONPATH={fresh_clone / "exporter"} exec {sys.executable} "$@"\n'
    )
    (venv / "tele-exporter").write_text(f'#!/bin/sh\nexec {python} -m tele_exporter.cli "$@"\n')
    for script in (python, venv / "tele-exporter"):
        script.chmod(0o755)
    env = {**os.environ, "VIRTUAL_ENV": str(venv.parent)}
    run = subprocess.run(["make", "generate"], cwd=fresh_clone, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    pip = asked.read_text()
    assert "-e .[grafana]" in pip, pip  # the extra tele-exporter generate needs
    status = subprocess.run(["git", "status", "--porcelain"], cwd=fresh_clone, capture_output=True, text=True)
    assert status.stdout == "", f"make generate changed a fresh clone:\n{status.stdout}"


# -- "Instrument your own PPO loop": every snippet runs ----------------------------------------------

SECTION = "## Instrument your own PPO loop"
EPOCHS, MINIBATCHES, MINIBATCH, NUM_UPDATES = 3, 4, 16, 4


def _section_blocks(language: str) -> list[str]:
    """The section's fenced blocks in `language`, dedented (a block inside a list item is indented)."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(SECTION)
    end = readme.index("\n## ", start + len(SECTION))
    pattern = rf"^( *)```{language}\n(.*?)^\1```$"
    return [textwrap.dedent(m.group(2)) for m in re.finditer(pattern, readme[start:end], re.M | re.S)]


class _Policy(nn.Module):
    """A real tiny actor-critic: 4 observations, 2 actions."""

    def __init__(self) -> None:
        super().__init__()
        self.actor = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
        self.critic = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


@dataclass
class _Rollout:
    update: int
    obs: torch.Tensor
    actions: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def minibatches(self) -> Iterator[tuple[int, torch.Tensor]]:
        for chunk in torch.randperm(MINIBATCHES * MINIBATCH).split(MINIBATCH):
            yield self.update, chunk


class _Trainer:
    """What the README leaves to "your code": rollouts and a clipped PPO loss; it records every log-ratio."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.policy = _Policy()
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=1e-2)
        self.log_ratios: list[list[torch.Tensor]] = []

    def collect_rollout(self, policy: _Policy) -> _Rollout:
        obs = torch.randn(MINIBATCHES * MINIBATCH, 4)
        with torch.no_grad():
            dist = Categorical(logits=policy.actor(obs))
            actions = dist.sample()
            old_logp = dist.log_prob(actions)
        self.log_ratios.append([])
        return _Rollout(len(self.log_ratios) - 1, obs, actions, old_logp, torch.randn(len(obs)), torch.randn(len(obs)))

    def ppo_loss(self, policy: _Policy, mb: tuple[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        update, idx = mb
        rollout = self.rollouts[update]
        logp = Categorical(logits=policy.actor(rollout.obs[idx])).log_prob(rollout.actions[idx])
        log_ratio = logp - rollout.old_logp[idx]
        ratio = log_ratio.exp()
        adv = rollout.advantages[idx]
        surrogate = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
        value = 0.5 * (policy.critic(rollout.obs[idx]).squeeze(-1) - rollout.returns[idx]).pow(2).mean()
        self.log_ratios[update].append(log_ratio.detach())
        return surrogate + value, log_ratio.detach()

    def namespace(self, run_name: str) -> dict[str, Any]:
        self.rollouts: list[_Rollout] = []

        def collect(policy: _Policy) -> _Rollout:
            self.rollouts.append(self.collect_rollout(policy))
            return self.rollouts[-1]

        return {
            "policy": self.policy,
            "optimizer": self.optimizer,
            "collect_rollout": collect,
            "ppo_loss": self.ppo_loss,
            "num_updates": NUM_UPDATES,
            "epochs": EPOCHS,
            "target_kl": 0.01,
            "run_name": run_name,
        }


def _k3(r: torch.Tensor) -> float:
    r64 = r.double()
    return float((r64.exp() - 1 - r64).mean())


def test_readme_snippets_are_all_run_here() -> None:
    assert len(_section_blocks("python")) == 3
    assert len(_section_blocks("yaml")) == 1


def test_readme_loop_runs_and_serves_what_it_measures(capsys: pytest.CaptureFixture[str]) -> None:
    loop = _section_blocks("python")[0]
    trainer = _Trainer()
    ns = trainer.namespace("readme")
    scraper = Scraper(ns)
    scraper.start()
    try:
        exec(compile(loop, "README.md", "exec"), ns)
    finally:
        scraper.stop()

    server, tele = ns["server"], ns["tele"]
    assert not server.running
    assert f"{server.url} (port {server.port})" in capsys.readouterr().out and server.port > 0
    got = scraper.samples()  # close(linger=30) returned after a scrape of the last update
    run = ("run", "readme")
    assert got[("tele_ppo_updates_total", (run,))] == NUM_UPDATES
    observed = trainer.log_ratios[-1][MINIBATCHES - 1 :: MINIBATCHES]  # observe_kl: each epoch's last minibatch
    expected = math.fsum(_k3(r) for r in observed) / len(observed)
    assert got[("tele_kl_divergence", (run,))] == pytest.approx(expected, rel=1e-6)
    assert got[("tele_policy_grad_norm", (("clip", "pre"), run))] > 0
    assert tele.errors() == {}


def test_readme_disabled_snippet_binds_nothing() -> None:
    ns = _Trainer().namespace("off")
    disabled = "from tele_exporter import Telemetry, serve\n" + _section_blocks("python")[2]
    exec(compile(disabled, "README.md", "exec"), ns)
    assert ns["tele"].enabled is False


def _runs_in(result: list[dict[str, Any]], expected: int) -> dict[str, dict[str, Any]] | None:
    """Prometheus' result by `run` label, once every run is in it."""
    by_run = {r["metric"]["run"]: r for r in result}
    return by_run if len(by_run) == expected else None


@pytest.mark.servers
def test_readme_parallel_runs_reach_prometheus_through_file_sd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(_section_blocks("yaml")[0])
    (job,) = config["scrape_configs"]
    job["file_sd_configs"][0]["files"] = [str(tmp_path / pattern) for pattern in job["file_sd_configs"][0]["files"]]
    config["global"] = {"scrape_interval": "1s"}
    (tmp_path / "tele-targets").mkdir()  # as the README says: before Prometheus starts, which watches it
    parallel = compile("from tele_exporter import serve\n" + _section_blocks("python")[1], "README.md", "exec")
    runs: dict[str, dict[str, Any]] = {}
    for run_name in ("seed-1", "seed-2"):
        trainer = _Trainer()
        ns = trainer.namespace(run_name)
        ns["tele"] = Telemetry(trainer.policy, heads={"actor": trainer.policy.actor}, const_labels={"run": run_name})
        for _ in range(2):  # the snippet's `...`: training, done before it serves here
            with ns["tele"].update() as upd:
                loss, _ = trainer.ppo_loss(trainer.policy, next(ns["collect_rollout"](trainer.policy).minibatches()))
                loss.backward()
                upd.clip_grad_norm_(0.5)
        runs[run_name] = ns

    with start_prometheus(yaml.safe_dump(config)) as prom:
        threads = [threading.Thread(target=exec, args=(parallel, ns)) for ns in runs.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for ns in runs.values():
            assert not ns["server"].running and not ns["target"].exists()
        found = poll(lambda: _runs_in(prom.query("last_over_time(tele_ppo_updates_total[5m])"), len(runs)), 30)
    assert set(found) == set(runs)
    for run_name, ns in runs.items():
        assert found[run_name]["metric"]["instance"] == f"127.0.0.1:{ns['server'].port}"
        assert float(found[run_name]["value"][1]) == 2
