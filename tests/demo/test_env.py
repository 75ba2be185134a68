"""The seed-management environment: seed lifecycle, watches, rewards and episodes."""

from __future__ import annotations

import math

import pytest
import torch

from tele_exporter import Telemetry
from tele_exporter.demo.env import (
    ALPHA_TARGETS,
    BLUEPRINT_WIDTHS,
    Action,
    EnvConfig,
    Op,
    SeedEnv,
    Stage,
    VecEnv,
    slot_names,
)
from tele_exporter.demo.policy import Policy


@pytest.fixture
def tele() -> Telemetry:
    policy = Policy(obs_dim=10, n_slots=3)
    return Telemetry(policy, heads=policy.head_modules())


def watched(tele: Telemetry) -> set[tuple[str, str]]:
    return {(s.env, s.slot) for s in tele.snapshot().seeds}


def test_slots_are_named_by_row_and_column() -> None:
    assert slot_names(3) == ("r0c0", "r0c1", "r0c2")


def test_germinate_watches_and_prune_releases(tele: Telemetry) -> None:
    env = SeedEnv("3", EnvConfig(), seed=0, tele=tele)
    env.step(Action(op=Op.GERMINATE, slot=1, blueprint=2))
    assert env.slots[1].stage == Stage.TRAINING
    assert watched(tele) == {("3", "r0c1")}
    assert not env.germinate(1), "a taken slot cannot germinate again"
    env.step(Action(op=Op.PRUNE, slot=1, alpha_speed=2))
    assert env.slots[1].stage in (Stage.PRUNING, Stage.EMPTY)
    for _ in range(5):
        env.step(Action(op=Op.WAIT))
    assert env.slots[1].stage == Stage.EMPTY
    assert watched(tele) == set()


def test_fossilize_releases_the_watch_but_keeps_the_seed(tele: Telemetry) -> None:
    env = SeedEnv("0", EnvConfig(), seed=0, tele=tele)
    env.step(Action(op=Op.GERMINATE, slot=0, alpha_target=2))
    for _ in range(3):
        env.step(Action(op=Op.ADVANCE))
    env.step(Action(op=Op.FOSSILIZE, slot=0))
    slot = env.slots[0]
    assert slot.stage == Stage.FOSSILIZED and slot.seed is not None
    assert not any(p.requires_grad for p in slot.seed.parameters())
    assert watched(tele) == set()
    _, reward, _ = env.step(Action(op=Op.WAIT))
    assert math.isfinite(reward)


def test_invalid_ops_cost_the_invalid_penalty() -> None:
    cfg = EnvConfig()
    a, b = SeedEnv("0", cfg, seed=1), SeedEnv("0", cfg, seed=1)
    _, r_wait, _ = a.step(Action(op=Op.WAIT))
    _, r_bad, _ = b.step(Action(op=Op.PRUNE, slot=0))
    assert r_wait - r_bad == pytest.approx(cfg.invalid_penalty)


def test_live_seed_reports_a_measured_gradient_ratio(tele: Telemetry) -> None:
    env = SeedEnv("0", EnvConfig(), seed=0, tele=tele)
    env.step(Action(op=Op.GERMINATE, slot=0))
    with tele.update():
        for _ in range(3):
            env.step(Action(op=Op.WAIT))
    (seed,) = tele.snapshot().seeds
    assert seed.passes == 4, "the germinating step and three more trained the host through it"
    assert seed.ratio > 0 and seed.backward_gain is not None  # measured
    assert 0.5 <= seed.backward_gain <= 2.0  # the residual seed passes gradient on


def test_episode_ends_and_resets_the_slots(tele: Telemetry) -> None:
    cfg = EnvConfig(episode_steps=4)
    vec = VecEnv(2, cfg, seed=0, tele=tele)
    germinate = Action(op=Op.GERMINATE, slot=2)
    obs, rewards, dones = vec.step([germinate, germinate])
    assert obs.shape == (2, vec.obs_dim) and rewards.shape == dones.shape == (2,)
    assert watched(tele) == {("0", "r0c2"), ("1", "r0c2")}
    for _ in range(3):
        obs, rewards, dones = vec.step([Action(op=Op.WAIT)] * 2)
    assert torch.equal(dones, torch.ones(2))
    assert watched(tele) == set()
    assert all(s.stage == Stage.EMPTY for e in vec.envs for s in e.slots)


def test_a_diverging_host_ends_its_episode_with_the_collapse_penalty() -> None:
    """A host whose validation loss blows up (or goes NaN) is reset: observations and rewards stay finite."""
    cfg = EnvConfig(host_lr=50.0, episode_steps=1000)
    vec = VecEnv(1, cfg, seed=0)
    collapsed = 0
    for _ in range(20):
        obs, rewards, dones = vec.step([Action(op=Op.WAIT)])
        assert torch.isfinite(obs).all() and torch.isfinite(rewards).all()
        if dones[0]:
            collapsed += 1
            assert rewards[0] == -cfg.collapse_penalty and vec.envs[0].t == 0
    assert collapsed > 0


def _float64_rms(params: list[torch.nn.Parameter]) -> float:
    """Gradient RMS over every element of params, in float64 from their .grad."""
    grads = [p.grad.detach().to(torch.float64) for p in params if p.grad is not None]
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads) / sum(p.numel() for p in params))


@pytest.mark.parametrize("alpha_target", range(len(ALPHA_TARGETS)))
@pytest.mark.parametrize("blueprint", range(len(BLUEPRINT_WIDTHS)))
def test_fresh_seed_reads_healthy_at_every_alpha(tele: Telemetry, alpha_target: int, blueprint: int) -> None:
    """The demo's seeds learn at about their host's per-parameter rate whatever their alpha (TELE-557)."""
    env = SeedEnv("0", EnvConfig(), seed=0, tele=tele)
    with tele.update():  # publishes the germinating step's pass, so the next update holds only its own
        env.step(Action(op=Op.GERMINATE, slot=1, blueprint=blueprint, alpha_target=alpha_target))
    seed = env.slots[1].seed
    assert seed is not None
    seed.alpha = ALPHA_TARGETS[alpha_target]
    expected: list[float] = []
    with tele.update():
        for _ in range(8):
            env.step(Action(op=Op.WAIT))
            seed_rms, host_rms = _float64_rms(list(seed.parameters())), _float64_rms(list(env.host.parameters()))
            expected.append(seed_rms / (host_rms + 1e-8))
    (state,) = tele.snapshot().seeds
    assert seed.alpha == ALPHA_TARGETS[alpha_target] and state.passes == len(expected)
    assert state.ratio == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert 0.5 <= state.ratio <= 2.0 and not state.vanishing and not state.exploding
