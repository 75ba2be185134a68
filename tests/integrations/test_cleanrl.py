"""docs/cleanrl.md: its diff against CleanRL's ppo.py, mirrored line for line here and scraped for real.

`test_the_loop_mirrors_the_docs_diff_and_exports_what_cleanrl_logs` runs CleanRL
ppo.py's update (Agent, GAE, minibatch epochs, approx_kl, clipfracs, the early
stop, the explained variance) with every line the doc's diff adds written here
exactly as the diff has it (a test checks that), and compares a real /metrics
scrape after every update with the values ppo.py logs, computed with ppo.py's
own expressions, and with float64 gradient norms the loop takes itself.

`test_the_docs_diff_applied_to_cleanrls_ppo_py_exports_what_it_logs` applies the
diff to a stock ppo.py with `git apply` and runs it. It needs that file (its path
in $CLEANRL_PPO_PY) and CleanRL's own environment (gymnasium 0.29.1, tyro,
tensorboard: the `cleanrl` extra), so it is skipped elsewhere.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("gymnasium")

import gymnasium as gym
import torch
from torch import nn
from torch.distributions.categorical import Categorical

from tele_exporter import Telemetry, serve
from tests.support.reference import norm64
from tests.support.scraper import Samples, scrape

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "cleanrl.md"
ITERATIONS = 4


def _diff() -> str:
    """The doc's unified diff against cleanrl/ppo.py."""
    (diff,) = re.findall(r"^```diff\n(.*?)^```$", DOC.read_text(), re.M | re.S)
    return str(diff)


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """CleanRL's ppo.py Agent: separate actor and critic MLPs."""

    def __init__(self, envs: Any) -> None:
        super().__init__()
        obs = int(np.array(envs.single_observation_space.shape).prod())
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, envs.single_action_space.n), std=0.01),
        )

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x)  # type: ignore[no-any-return]

    def get_action_and_value(
        self, x: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = Categorical(logits=self.actor(x))
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


def _args() -> SimpleNamespace:
    """ppo.py's Args for a short CartPole run; a higher learning rate so that the surrogate clips in 4 updates."""
    args = SimpleNamespace(
        env_id="CartPole-v1",
        seed=1,
        num_envs=4,
        num_steps=32,
        learning_rate=3e-3,
        gamma=0.99,
        gae_lambda=0.95,
        num_minibatches=4,
        update_epochs=3,
        norm_adv=True,
        clip_coef=0.2,
        clip_vloss=True,
        ent_coef=0.01,
        vf_coef=0.5,
        max_grad_norm=0.5,
        target_kl=0.015,
    )
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    return args


@pytest.mark.slow
def test_the_loop_mirrors_the_docs_diff_and_exports_what_cleanrl_logs() -> None:
    args = _args()
    run_name = "cleanrl"
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(args.env_id) for _ in range(args.num_envs)])
    assert isinstance(envs.single_action_space.n, np.integer)  # what action_sizes gets below: a numpy int

    agent = Agent(envs)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    tele = Telemetry(agent, heads={"actor": agent.actor}, groups={"critic": agent.critic},
                     action_sizes={"actor": envs.single_action_space.n}, const_labels={"run": run_name})  # fmt: skip
    server = serve(tele, port=0, linger=30)
    print(f"tele-exporter: {server.url}")

    shape = envs.single_observation_space.shape
    obs = torch.zeros((args.num_steps, args.num_envs, *shape))
    actions = torch.zeros((args.num_steps, args.num_envs))
    logprobs = torch.zeros((args.num_steps, args.num_envs))
    rewards = torch.zeros((args.num_steps, args.num_envs))
    dones = torch.zeros((args.num_steps, args.num_envs))
    values = torch.zeros((args.num_steps, args.num_envs))
    next_obs_np, _ = envs.reset(seed=args.seed)
    next_obs, next_done = torch.Tensor(next_obs_np), torch.zeros(args.num_envs)
    scraped: list[Samples] = []
    logged: list[dict[str, Any]] = []

    for _iteration in range(ITERATIONS):
        for step in range(args.num_steps):
            obs[step], dones[step] = next_obs, next_done
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
                values[step] = value.flatten()
            actions[step], logprobs[step] = action, logprob
            next_obs_np, reward, terminations, truncations, _ = envs.step(action.cpu().numpy())
            rewards[step] = torch.tensor(reward).view(-1)
            next_obs, next_done = torch.Tensor(next_obs_np), torch.Tensor(np.logical_or(terminations, truncations))
        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages = torch.zeros_like(rewards)
            lastgaelam: torch.Tensor | float = 0.0
            for t in reversed(range(args.num_steps)):
                nextnonterminal = 1.0 - (next_done if t == args.num_steps - 1 else dones[t + 1])
                nextvalues = next_value if t == args.num_steps - 1 else values[t + 1]
                delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
            returns = advantages + values
        b_obs = obs.reshape((-1, *shape))
        b_logprobs, b_actions = logprobs.reshape(-1), actions.reshape(-1)
        b_advantages, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), values.reshape(-1)

        b_inds = np.arange(args.batch_size)
        clipfracs: list[float] = []
        reference: dict[str, list[float]] = {"pre": [], "post": [], "actor": [], "critic": []}
        upd = tele.update().__enter__()  # one PPO update; `with tele.update() as upd:` would re-indent the loop
        for _epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, args.batch_size, args.minibatch_size):
                mb_inds = b_inds[start : start + args.minibatch_size]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb_inds], b_actions.long()[mb_inds])
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]
                mb_advantages = b_advantages[mb_inds]
                mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()
                newvalue = newvalue.view(-1)
                v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                v_clipped = b_values[mb_inds] + torch.clamp(
                    newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef
                )
                v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - b_returns[mb_inds]) ** 2).mean()
                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                optimizer.zero_grad()
                loss.backward()
                reference["pre"].append(norm64(agent.parameters()))
                reference["actor"].append(norm64(agent.actor.parameters()))
                reference["critic"].append(norm64(agent.critic.parameters()))
                upd.clip_grad_norm_(args.max_grad_norm)
                reference["post"].append(norm64(agent.parameters()))
                optimizer.step()

            if args.target_kl is not None and approx_kl > args.target_kl:
                upd.early_stop()
                break

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        upd.observe_kl_value(approx_kl)  # losses/approx_kl
        upd.observe_clip_fraction(np.mean(clipfracs))  # losses/clipfrac
        upd.observe_entropy({"actor": entropy})  # losses/entropy
        upd.observe_explained_variance(b_values, b_returns)  # losses/explained_variance
        upd.__exit__(None, None, None)  # publish the update

        # What ppo.py's writer.add_scalar lines log, with ppo.py's own expressions.
        logged.append(
            {
                "losses/approx_kl": approx_kl.item(),
                "losses/clipfrac": np.mean(clipfracs),
                "losses/entropy": entropy_loss.item(),
                "losses/explained_variance": float(explained_var),
                **reference,
            }
        )
        scraped.append(scrape(server.url))
    envs.close()
    server.close()  # waits up to 30 s for Prometheus to scrape the final update
    tele.close()

    run = ("run", run_name)
    for own, got in zip(logged, scraped, strict=True):
        assert got[("tele_kl_divergence", (run,))] == own["losses/approx_kl"]
        assert got[("tele_ppo_clip_fraction", (run,))] == own["losses/clipfrac"]
        # ppo.py logs float32 means; tele-exporter takes them in float64 from the same float32 values.
        assert got[("tele_policy_entropy", (run,))] == pytest.approx(own["losses/entropy"], rel=1e-6)
        assert got[("tele_explained_variance", (run,))] == pytest.approx(own["losses/explained_variance"], abs=1e-6)
        assert (
            got[("tele_head_entropy_normalized", (("head", "actor"), run))]
            == pytest.approx(own["losses/entropy"] / math.log(2), rel=1e-6)  # CartPole: 2 actions
        )
        for clip in ("pre", "post"):
            expected = float(np.mean(own[clip]))
            assert got[("tele_policy_grad_norm", (("clip", clip), run))] == pytest.approx(expected, rel=1e-6)
        for head, kind in (("actor", "action"), ("critic", "other")):
            expected = float(np.mean(own[head]))
            assert got[("tele_head_grad_norm", (("head", head), ("kind", kind), run))] == pytest.approx(
                expected, rel=1e-6
            )
        # One action head: nothing for the CV to compare (0, or absent), and the critic is no part of it.
        assert got.get(("tele_gradient_cv", (run,)), 0.0) == 0.0
        assert max(own["post"]) <= args.max_grad_norm * (1 + 1e-5)
    assert scraped[-1][("tele_ppo_updates_total", (run,))] == ITERATIONS
    assert any(own["losses/clipfrac"] > 0 for own in logged)  # the clip fraction is exercised, not only zeros


def test_the_loop_above_has_every_line_the_docs_diff_adds_and_none_it_removes() -> None:
    source = {line.strip() for line in Path(__file__).read_text().splitlines()}
    diff = _diff()
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert added and removed
    for line in added:
        if line and line != "from tele_exporter import Telemetry, serve":  # imported above with the test's own
            assert line in source or f"{line}  # fmt: skip" in source, f"docs/cleanrl.md adds {line!r}; not here"
    for line in removed:
        assert line not in source, f"docs/cleanrl.md removes {line!r}; the test still has it"


def test_the_docs_diff_counts_its_lines_truthfully() -> None:
    diff = _diff()
    added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    code = [line for line in added if line[1:].strip()]
    text = DOC.read_text()
    assert f"{len(code)} added lines" in text and f"{len(removed)} changed" in text, (len(code), len(removed))
    reindented = [line for line in removed if line[1:].strip() in {a[1:].strip() for a in added}]
    assert not reindented, "the diff re-indents lines it says it leaves alone"


def test_numpy_integers_are_accepted_wherever_ints_are() -> None:
    policy = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 5))
    n = gym.spaces.Discrete(5).n
    assert isinstance(n, np.integer) and not isinstance(n, int)
    tele = Telemetry(
        policy,
        heads={"move": (policy[1], slice(np.int64(0), np.int64(3))), "fire": (policy[1], slice(np.int32(3), None))},
        action_sizes={"move": np.int64(3), "fire": np.int16(2)},
    )
    with tele.update() as upd:
        logits = policy(torch.randn(4, 3))
        moves, fires = Categorical(logits=logits[:, :3]), Categorical(logits=logits[:, 3:])
        upd.observe_entropy({"move": moves.entropy(), "fire": fires.entropy()})
        logits.sum().backward()
        upd.observe_gradients()
    snap = tele.snapshot()
    assert [h.name for h in snap.heads] == ["move", "fire"] and snap.head("move").current > 0
    assert set(snap.policy.head_entropy) == {"move", "fire"}
    tele.close()
    with pytest.raises(ValueError, match=r"action_sizes\['move'\] must be an int >= 1"):
        Telemetry(policy, heads={"move": policy[1]}, action_sizes={"move": np.int64(0)})
    with pytest.raises(ValueError, match=r"action_sizes\['move'\] must be an int >= 1"):
        Telemetry(policy, heads={"move": policy[1]}, action_sizes={"move": np.float64(3.0)})  # type: ignore[dict-item]


CLEANRL_PPO = os.environ.get("CLEANRL_PPO_PY", "")


def _tensorboard_scalars(runs: Path) -> dict[str, list[float]]:
    """Every scalar ppo.py wrote to its TensorBoard event file, by tag, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.skipif(not CLEANRL_PPO, reason="set CLEANRL_PPO_PY to a stock cleanrl/ppo.py to run it patched")
def test_the_docs_diff_applied_to_cleanrls_ppo_py_exports_what_it_logs(tmp_path: Path) -> None:
    pytest.importorskip("tyro")
    pytest.importorskip("tensorboard")
    if int(gym.__version__.split(".")[0]) >= 1:
        pytest.skip(f"ppo.py needs CleanRL's gymnasium 0.29.1 (final_info); this is {gym.__version__}")
    script = tmp_path / "cleanrl" / "ppo.py"
    script.parent.mkdir()
    script.write_bytes(Path(CLEANRL_PPO).read_bytes())
    (tmp_path / "docs.diff").write_text(_diff())
    subprocess.run(["git", "apply", "--unsafe-paths", "-p1", "docs.diff"], cwd=tmp_path, check=True)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "exporter"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(script), "--no-cuda", "--total-timesteps", "2048", "--learning-rate", "3e-3"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    by_update: dict[int, Samples] = {}
    output: list[str] = []
    done = threading.Event()

    def prometheus(url: str) -> None:
        while not done.wait(0.02):
            try:
                got = scrape(url)
            except OSError:
                continue
            updates = int(got.get(("tele_ppo_updates_total", (("run", run_label),)), 0))
            by_update.setdefault(updates, got)

    scraper: threading.Thread | None = None
    run_label = ""
    for line in proc.stdout:
        output.append(line)
        if line.startswith("tele-exporter: ") and scraper is None:
            url = line.split(": ", 1)[1].strip()
            run_label = next(p.name for p in (tmp_path / "runs").iterdir())
            scraper = threading.Thread(target=prometheus, args=(url,), daemon=True)
            scraper.start()
    assert proc.wait(timeout=600) == 0, "".join(output[-20:])
    done.set()
    assert scraper is not None, "ppo.py printed no tele-exporter URL"
    scraper.join()

    logged = _tensorboard_scalars(tmp_path / "runs")
    iterations = len(logged["losses/approx_kl"])
    assert iterations == 2048 // (4 * 128)
    assert any("episodic_return" in line for line in output)  # CleanRL's own logging works under this gymnasium
    run = ("run", run_label)
    for k in range(1, iterations + 1):
        got = by_update[k]  # the final one was scraped before server.close() returned
        # TensorBoard keeps float32 scalars: each comparison is to float32 rounding of ppo.py's own value.
        for metric, tag in (
            ("tele_kl_divergence", "losses/approx_kl"),
            ("tele_ppo_clip_fraction", "losses/clipfrac"),
            ("tele_policy_entropy", "losses/entropy"),
            ("tele_explained_variance", "losses/explained_variance"),
        ):
            assert got[(metric, (run,))] == pytest.approx(logged[tag][k - 1], rel=1e-6, abs=1e-6), (k, metric)
        assert ("tele_head_grad_norm", (("head", "actor"), ("kind", "action"), run)) in got
