"""README: its metric table matches the catalog, CI runs the test command it gives, and its PPO-loop snippets run.

The snippets of "Instrument your own PPO loop" run as written against a real
tiny torch actor-critic and rollouts this file supplies (the README's "your
code"); what they serve is scraped and checked against a float64 k3 of the
log-ratios the loop saw, and the parallel-runs snippet is found by a real
Prometheus through the README's file_sd config.
"""

from __future__ import annotations

import math
import re
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


def test_docker_compose_commands_are_the_validated_v1_form() -> None:
    for path in (ROOT / "README.md", ROOT / "docs" / "grafana.md"):
        commands = re.findall(r"^(docker[ -]compose) ", path.read_text(), re.M)
        assert commands and set(commands) == {"docker-compose"}, (path.name, commands)


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
