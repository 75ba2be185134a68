"""docs/cleanrl.md: a minimal loop in CleanRL ppo.py's style, instrumented as the doc says, scraped for real.

The loop below follows CleanRL's ppo.py line for line where it matters (Agent,
GAE, minibatch epochs, approx_kl, clipfracs, the early stop), with the doc's
tele-exporter lines in place. The loop's own logged values and an independent
float64 gradient norm taken before each clip are compared with a real /metrics scrape.
"""

from __future__ import annotations

import math
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
from tests.support.scraper import scrape

NUM_ENVS, NUM_STEPS, MINIBATCHES, EPOCHS, ITERATIONS = 4, 32, 4, 3, 4
CLIP_COEF, MAX_GRAD_NORM, TARGET_KL = 0.2, 0.5, 0.015
LEARNING_RATE = 3e-3  # CleanRL's 2.5e-4 never clips in a run this short; the clip fraction must be exercised


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """CleanRL's ppo.py Agent: separate actor and critic MLPs."""

    def __init__(self, obs: int, actions: int) -> None:
        super().__init__()
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
            layer_init(nn.Linear(64, actions), std=0.01),
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


@pytest.mark.slow
def test_cleanrl_style_loop_exports_what_it_computes() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1") for _ in range(NUM_ENVS)])
    agent = Agent(int(np.prod(envs.single_observation_space.shape)), int(envs.single_action_space.n))
    optimizer = torch.optim.Adam(agent.parameters(), lr=LEARNING_RATE, eps=1e-5)
    batch_size = NUM_ENVS * NUM_STEPS
    minibatch_size = batch_size // MINIBATCHES

    tele = Telemetry(
        agent, heads={"actor": agent.actor}, groups={"critic": agent.critic}, const_labels={"run": "cleanrl"}
    )
    server = serve(tele, port=0, linger=10)

    obs = torch.zeros((NUM_STEPS, NUM_ENVS, *envs.single_observation_space.shape))
    actions = torch.zeros((NUM_STEPS, NUM_ENVS))
    logprobs = torch.zeros((NUM_STEPS, NUM_ENVS))
    rewards = torch.zeros((NUM_STEPS, NUM_ENVS))
    dones = torch.zeros((NUM_STEPS, NUM_ENVS))
    values = torch.zeros((NUM_STEPS, NUM_ENVS))
    next_obs_np, _ = envs.reset(seed=1)
    next_obs, next_done = torch.Tensor(next_obs_np), torch.zeros(NUM_ENVS)
    scraped: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []
    logged: list[dict[str, Any]] = []

    for _ in range(ITERATIONS):
        for step in range(NUM_STEPS):
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
            for t in reversed(range(NUM_STEPS)):
                nextnonterminal = 1.0 - (next_done if t == NUM_STEPS - 1 else dones[t + 1])
                nextvalues = next_value if t == NUM_STEPS - 1 else values[t + 1]
                delta = rewards[t] + 0.99 * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = delta + 0.99 * 0.95 * nextnonterminal * lastgaelam
            returns = advantages + values
        b_obs = obs.reshape((-1, *envs.single_observation_space.shape))
        b_logprobs, b_actions = logprobs.reshape(-1), actions.reshape(-1)
        b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)

        b_inds = np.arange(batch_size)
        clipfracs: list[float] = []
        reference: dict[str, list[float]] = {"pre": [], "post": [], "actor": [], "critic": []}
        with tele.update() as upd:  # tele-exporter: the update's epochs, indented once
            for _epoch in range(EPOCHS):
                np.random.shuffle(b_inds)
                for start in range(0, batch_size, minibatch_size):
                    mb_inds = b_inds[start : start + minibatch_size]
                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(
                        b_obs[mb_inds], b_actions.long()[mb_inds]
                    )
                    logratio = newlogprob - b_logprobs[mb_inds]
                    ratio = logratio.exp()
                    with torch.no_grad():
                        approx_kl = ((ratio - 1) - logratio).mean()
                        clipfracs += [((ratio - 1.0).abs() > CLIP_COEF).float().mean().item()]
                    upd.observe_clip_fraction(clipfracs[-1])  # tele-exporter
                    mb_advantages = b_advantages[mb_inds]
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                    pg_loss1 = -mb_advantages * ratio
                    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - CLIP_COEF, 1 + CLIP_COEF)
                    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
                    v_loss = 0.5 * ((newvalue.view(-1) - b_returns[mb_inds]) ** 2).mean()
                    loss = pg_loss - 0.01 * entropy.mean() + v_loss * 0.5

                    optimizer.zero_grad()
                    loss.backward()
                    reference["pre"].append(norm64(agent.parameters()))
                    reference["actor"].append(norm64(agent.actor.parameters()))
                    reference["critic"].append(norm64(agent.critic.parameters()))
                    upd.clip_grad_norm_(MAX_GRAD_NORM)  # tele-exporter: was nn.utils.clip_grad_norm_
                    reference["post"].append(norm64(agent.parameters()))
                    optimizer.step()
                if approx_kl > TARGET_KL:
                    upd.early_stop()  # tele-exporter
                    break
            upd.observe_kl_value(approx_kl)  # tele-exporter: CleanRL's losses/approx_kl, the last minibatch's
        logged.append({"approx_kl": approx_kl.item(), "clipfrac": np.mean(clipfracs), **reference})
        scraped.append(scrape(server.url))
    envs.close()
    assert server.close()
    tele.close()

    run = ("run", "cleanrl")
    for own, got in zip(logged, scraped, strict=True):
        assert got[("tele_kl_divergence", (run,))] == pytest.approx(own["approx_kl"], rel=1e-7)
        assert got[("tele_ppo_clip_fraction", (run,))] == pytest.approx(own["clipfrac"], rel=1e-12, abs=1e-15)
        for clip in ("pre", "post"):
            expected = float(np.mean(own[clip]))
            assert got[("tele_policy_grad_norm", (("clip", clip), run))] == pytest.approx(expected, rel=1e-6)
        for head, kind in (("actor", "action"), ("critic", "other")):
            expected = float(np.mean(own[head]))
            assert got[("tele_head_grad_norm", (("head", head), ("kind", kind), run))] == pytest.approx(
                expected, rel=1e-6
            )
        assert got[("tele_gradient_cv", (run,))] == 0.0  # one action head: the critic is no part of the CV
        assert max(own["post"]) <= MAX_GRAD_NORM * (1 + 1e-5)
    assert scraped[-1][("tele_ppo_updates_total", (run,))] == ITERATIONS
    assert any(own["clipfrac"] > 0 for own in logged)  # the clip fraction is exercised, not only zeros
