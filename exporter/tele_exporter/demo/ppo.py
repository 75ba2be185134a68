"""PPO for the factored seed-management policy, instrumented with Telemetry.

One update = a rollout of every environment (under no_grad) + GAE + clipped
surrogate epochs over minibatches, all inside `tele.update()`, so the seeds'
backward passes during the rollout and the policy's gradients, KL and early
stop during optimisation land in the same published snapshot.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry
from torch import Tensor

from ..catalog.model import default_catalog
from ..snapshot import PolicyState, Snapshot
from ..telemetry.telemetry import Telemetry, Update
from .env import HEADS, Action, EnvConfig, VecEnv, head_sizes
from .faults import FaultPlan
from .policy import Policy, causal_masks, entropies, log_probs, sample

RESULTS_KEPT = 1000
MAX_HEAD_WEIGHT = 20.0


@dataclass(frozen=True)
class DemoConfig:
    """Everything a demo run depends on; a fixed seed gives a reproducible run."""

    updates: int = 50  # 0: run until stopped
    envs: int = 8
    steps: int = 32  # environment steps per env per update
    epochs: int = 4
    minibatches: int = 2
    lr: float = 1e-3
    gamma: float = 0.9
    gae_lambda: float = 0.95
    clip: float = 0.2
    policy_coef: float = 0.25  # weight of the policy term, a sum over the heads
    ent_coef: float = 0.25
    vf_coef: float = 0.5
    target_kl: float = 0.01
    max_grad_norm: float = 0.5
    head_balance: float = 0.5  # how fast per-head loss weights follow the heads' norms; 0: all weights 1
    seed: int = 0
    device: str = "cpu"
    fault: FaultPlan = field(default_factory=FaultPlan)
    env: EnvConfig = field(default_factory=EnvConfig)


@dataclass(frozen=True)
class UpdateResult:
    """What one PPO update did, as read back from the published snapshot."""

    update: int  # 1-based
    reward: float  # mean per-step reward of the rollout
    kl: float | None  # None: missing (nothing was measured), as in the snapshot
    grad_norm_pre: float | None
    grad_norm_post: float | None
    gradient_cv: float | None
    early_stopped: bool
    fault_active: bool
    live_seeds: int
    seconds: float
    policy: PolicyState = field(default_factory=PolicyState)  # entropy, EV, advantages, ratios


@dataclass
class Rollout:
    """One update's transitions, [T, E] per field, on the policy's device."""

    obs: Tensor
    actions: dict[str, Tensor]
    logp: dict[str, Tensor]
    masks: dict[str, Tensor]
    values: Tensor
    rewards: Tensor
    dones: Tensor
    last_value: Tensor


def gae(
    rewards: Tensor, values: Tensor, dones: Tensor, last_value: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimates and returns; `dones[t]` ends the episode after step t."""
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(rewards.shape[0])):
        next_value = last_value if t == rewards.shape[0] - 1 else values[t + 1]
        keep = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * keep - values[t]
        running = delta + gamma * lam * keep * running
        adv[t] = running
    return adv, adv + values


class Trainer:
    """The demo trainer: environments, policy, optimizer and the Telemetry that watches them."""

    def __init__(
        self,
        config: DemoConfig | None = None,
        *,
        registry: CollectorRegistry | None = None,
        const_labels: Mapping[str, str] | None = None,
    ) -> None:
        self.config = cfg = config if config is not None else DemoConfig()
        if cfg.envs < 1 or cfg.steps < 1 or cfg.epochs < 1 or cfg.minibatches < 1:
            raise ValueError("envs, steps, epochs and minibatches must be >= 1")
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        self.vec = VecEnv(cfg.envs, cfg.env, cfg.seed)
        self.policy = Policy(self.vec.obs_dim, cfg.env.slots).to(self.device)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.lr, eps=1e-5)
        self.tele = Telemetry(
            self.policy,
            heads=self.policy.head_modules(),
            groups={"value": self.policy.value},  # measured and shown, outside the gradient CV
            registry=registry,
            const_labels=const_labels,
            action_sizes=head_sizes(cfg.env.slots),
            scale="records",  # the demo keeps the TELE records' scale: it pages on their absolute levels
            layers=True,  # every Linear: the layers x time heatmap, dead layers and update ratios per layer
        )
        for env in self.vec.envs:
            env.tele = self.tele
        self.kl_stop = default_catalog()["kl_divergence"].early_stop_factor
        if self.kl_stop is None:
            raise ValueError("the catalog's kl_divergence has no early_stop_factor")
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.obs = self.vec.observe()
        self.updates_done = 0
        self.head_weights = dict.fromkeys(HEADS, 1.0)

    def update(self) -> UpdateResult:
        """Run one rollout and one PPO update; publish the telemetry of both."""
        start = time.perf_counter()
        k = self.updates_done + 1
        on = self.config.fault.active(k)
        with self.tele.update() as upd:
            rollout = self.rollout(on)
            self._optimise(upd, rollout, on)
        self.updates_done = k
        snap = self.tele.snapshot()
        self._rebalance(snap)
        result = UpdateResult(
            update=k,
            reward=float(rollout.rewards.mean()),
            kl=snap.kl,
            grad_norm_pre=snap.grad_norm_pre,
            grad_norm_post=snap.grad_norm_post,
            gradient_cv=snap.gradient_cv,
            early_stopped=upd.stopped_early,
            fault_active=on,
            live_seeds=sum(len(e.live_seeds()) for e in self.vec.envs),
            seconds=time.perf_counter() - start,
            policy=snap.policy,
        )
        return result

    def run(
        self,
        updates: int | None = None,
        on_update: Callable[[UpdateResult], None] | None = None,
        stop: threading.Event | None = None,
    ) -> list[UpdateResult]:
        """Run `updates` updates (default: the config's; 0 runs until `stop` is set).

        Returns the results of the run (the latest RESULTS_KEPT of an endless one).
        """
        n = self.config.updates if updates is None else updates
        done: deque[UpdateResult] = deque(maxlen=n or RESULTS_KEPT)
        ran = 0
        while (n == 0 or ran < n) and not (stop is not None and stop.is_set()):
            result = self.update()
            done.append(result)
            ran += 1
            if on_update is not None:
                on_update(result)
        return list(done)

    def rollout(self, fault_on: bool = False, uniform: bool = False) -> Rollout:
        """Step every env `steps` times with the current (or a uniform random) policy."""
        cfg = self.config
        obs_buf: list[Tensor] = []
        acts: dict[str, list[Tensor]] = {h: [] for h in HEADS}
        logps: dict[str, list[Tensor]] = {h: [] for h in HEADS}
        values: list[Tensor] = []
        rewards: list[Tensor] = []
        dones: list[Tensor] = []
        with torch.no_grad():
            for _ in range(cfg.steps):
                cfg.fault.prepare_envs(self.vec, fault_on)
                obs = self.obs.to(self.device)
                logits, value = self.policy(obs)
                cfg.fault.sharpen(logits, fault_on)
                if uniform:
                    logits = {h: torch.zeros_like(lg) for h, lg in logits.items()}
                behaviour = cfg.fault.behaviour_logits(logits, fault_on, self.generator)
                chosen = sample(behaviour, self.generator)
                lp = log_probs(behaviour, chosen)
                for h in HEADS:
                    acts[h].append(chosen[h])
                    logps[h].append(lp[h])
                obs_buf.append(obs)
                values.append(cfg.fault.corrupt_values(value, fault_on, self.generator))
                rows = torch.stack([chosen[h] for h in HEADS], dim=1).cpu().tolist()
                self.obs, reward, done = self.vec.step([Action(*row) for row in rows])
                rewards.append(reward.to(self.device))
                dones.append(done.to(self.device))
            _, last_value = self.policy(self.obs.to(self.device))
        actions = {h: torch.stack(acts[h]) for h in HEADS}
        return Rollout(
            obs=torch.stack(obs_buf),
            actions=actions,
            logp={h: torch.stack(logps[h]) for h in HEADS},
            masks=causal_masks(actions["op"]),
            values=torch.stack(values),
            rewards=torch.stack(rewards),
            dones=torch.stack(dones),
            last_value=last_value,
        )

    def random_rewards(self, updates: int) -> list[float]:
        """Mean per-step reward of `updates` rollouts with a uniform random policy (a baseline)."""
        return [float(self.rollout(uniform=True).rewards.mean()) for _ in range(updates)]

    def close(self) -> None:
        """Release the seeds' watches and unregister the telemetry."""
        self.vec.close()
        self.tele.close()

    def _optimise(self, upd: Update, ro: Rollout, fault_on: bool) -> None:
        cfg = self.config
        adv, returns = gae(ro.rewards, ro.values, ro.dones, ro.last_value, cfg.gamma, cfg.gae_lambda)
        n = adv.numel()
        obs = ro.obs.reshape(n, -1)
        adv, returns = adv.reshape(n), returns.reshape(n)
        upd.observe_explained_variance(ro.values.reshape(n), returns)  # TELE-200: the rollout's values
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        upd.observe_advantages(adv)
        actions = {h: a.reshape(n) for h, a in ro.actions.items()}
        old_logp = {h: lp.reshape(n) for h, lp in ro.logp.items()}
        masks = {h: m.reshape(n) for h, m in ro.masks.items()}
        mb_size = max(1, n // cfg.minibatches)
        scale = cfg.fault.loss_scale(fault_on)
        assert self.kl_stop is not None
        host_masks = {h: m.bool().cpu() for h, m in masks.items()}
        # A head's loss is its masked sum over a minibatch divided by the square root of how many of
        # its steps the minibatch holds: the sum of n near-independent per-step gradients grows as
        # sqrt(n), so each optimizer step sees head norms of one scale whatever the head's step count.
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=self.generator, device=self.device)
            host_order = order.cpu()
            ratios: dict[str, list[Tensor]] = {h: [] for h in HEADS}
            for begin in range(0, n, mb_size):
                idx = order[begin : begin + mb_size]
                host_idx = host_order[begin : begin + mb_size]
                logits, value = self.policy(obs[idx])
                cfg.fault.sharpen(logits, fault_on)
                cfg.fault.poison(logits, fault_on)
                new_logp = log_probs(logits, {h: a[idx] for h, a in actions.items()})
                ent = entropies(logits)
                upd.observe_entropy({h: e.detach() for h, e in ent.items()}, {h: m[idx] for h, m in masks.items()})
                # TELE-160/161: the extremes of the taken actions' new log-probabilities, as the records' system keeps
                upd.observe_log_probs(
                    {h: lp.detach() for h, lp in new_logp.items()}, {h: m[idx] for h, m in masks.items()}
                )
                policy_loss = torch.zeros((), device=self.device)
                entropy = torch.zeros((), device=self.device)
                for h in HEADS:
                    log_ratio = new_logp[h] - old_logp[h][idx]
                    ratios[h].append(log_ratio.detach())
                    count = int(host_masks[h][host_idx].sum())
                    if count == 0:
                        continue  # no step in the minibatch used this head: no gradient, not zero
                    m = masks[h][idx]
                    valid = math.sqrt(count)
                    ratio = log_ratio.exp()
                    head_adv = adv[idx] * m
                    clipped = ratio.clamp(1 - cfg.clip, 1 + cfg.clip)
                    surrogate = torch.min(ratio * head_adv, clipped * head_adv)
                    weight = self.head_weights[h]
                    policy_loss = policy_loss - weight * surrogate.sum() / valid
                    entropy = entropy + weight * (ent[h] * m).sum() / valid
                value_loss = 0.5 * (value - returns[idx]).pow(2).mean()
                policy_term = cfg.policy_coef * (policy_loss - cfg.ent_coef * entropy)
                loss = policy_term + cfg.vf_coef * value_loss
                self.optimizer.zero_grad(set_to_none=True)
                (loss * scale).backward()
                pre = upd.clip_grad_norm_(cfg.max_grad_norm)
                if bool(torch.isfinite(pre)):
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            epoch_ratios = {h: torch.cat(r) for h, r in ratios.items()}
            epoch_masks = {h: m[order] for h, m in masks.items()}
            upd.observe_ratios(epoch_ratios, epoch_masks, clip_eps=cfg.clip)
            kl = upd.observe_kl(epoch_ratios, epoch_masks)
            if float(kl) > self.kl_stop * cfg.target_kl:
                upd.early_stop()
                break

    def _rebalance(self, snap: Snapshot) -> None:
        """Per-head loss weights that even out the heads' gradient norms (TeleGradientCVHigh's remedy).

        A head's parameters get gradient from its own loss term only, so its unweighted norm is
        its measured norm over its weight; each weight moves toward mean/unweighted, geometrically.
        A head that was missing or non-finite this update keeps its weight.
        """
        rate = self.config.head_balance
        raw = {
            h.name: h.current / self.head_weights[h.name]
            for h in snap.heads
            if h.kind == "action" and math.isfinite(h.current) and h.current > 0
        }
        if rate <= 0 or len(raw) < 2:
            return
        mean = sum(raw.values()) / len(raw)
        for name, value in raw.items():
            target = min(max(mean / value, 1 / MAX_HEAD_WEIGHT), MAX_HEAD_WEIGHT)
            self.head_weights[name] = self.head_weights[name] ** (1 - rate) * target**rate


def run_demo(
    config: DemoConfig | None = None,
    *,
    registry: CollectorRegistry | None = None,
    on_update: Callable[[UpdateResult], None] | None = None,
    stop: threading.Event | None = None,
) -> list[UpdateResult]:
    """Train for `config.updates` updates (0: until `stop`) and return every update's result."""
    trainer = Trainer(config, registry=registry)
    try:
        return trainer.run(on_update=on_update, stop=stop)
    finally:
        trainer.close()
