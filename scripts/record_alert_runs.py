"""Record what real trainers export, healthy and faulted, as fixtures for the alert precision/recall test.

Each scenario trains a real outside trainer (Stable-Baselines3 PPO on a Discrete, a
MultiDiscrete and a Box task; a CleanRL-style `ppo.py` loop; TorchRL's ClipPPOLoss; RLlib's
PPO with two learner actors, scraped over HTTP)
instrumented only with its integration's documented lines, and keeps the exposition
after every PPO update: the gauge and counter samples (histograms are left out; no
alert reads them). A faulted scenario injects one real fault from a given update on.
tests/alerting replays the fixtures through the generated rules with promtool.

    python scripts/record_alert_runs.py [--only NAME ...] [--out tests/alerting/fixtures]

All scenarios take about 15-25 minutes on a 2-core machine (one torch thread each).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "alerting" / "fixtures"

Samples = dict[str, float]
# Families the same at every scrape of a run: the catalog's level starts (these runs set no thresholds
# of their own, so the rules' fallback to the catalog's constants is the same), build and world size.
_CONSTANT_FAMILIES = {"tele_threshold", "tele_build_info", "tele_world_size"}


def scrape(registry: Any) -> Samples:
    """The registry's gauge and counter samples as {series: value}; histograms and _created are left out."""
    return parse(generate_latest(registry).decode())


def parse(exposition: str, keep: frozenset[str] = frozenset()) -> Samples:
    """An exposition's gauge and counter samples as {series: value}, less histograms, _created and the
    constant families (those named in `keep` stay)."""
    out: Samples = {}
    for family in text_string_to_metric_families(exposition):
        if family.type in ("histogram", "summary") or family.name in _CONSTANT_FAMILIES - keep:
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = float(s.value)
    return out


class Recording:
    """The scrapes of one run, one per published update, and the scenario around them."""

    def __init__(self, name: str, library: str, fault: str | None, fault_update: int | None) -> None:
        self.name, self.library, self.fault, self.fault_update = name, library, fault, fault_update
        self.scrapes: list[Samples] = []
        self.started = time.monotonic()
        self.crashed = ""  # the exception that ended the run, if it died

    def add(self, samples: Samples) -> None:
        self.scrapes.append(samples)

    def save(self, out: Path) -> Path:
        names = sorted({k for s in self.scrapes for k in s})
        data = {
            "run": self.name,
            "library": self.library,
            "fault": self.fault,
            "fault_update": self.fault_update,
            "seconds": round(time.monotonic() - self.started, 1),
            "updates": len(self.scrapes),
            "crashed": self.crashed or None,
            "series": {k: [_json(s.get(k)) for s in self.scrapes] for k in names},
        }
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.json"
        path.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
        return path


def _json(value: float | None) -> float | str | None:
    """JSON has no NaN or Inf: they are kept as the strings promtool's series notation uses."""
    if value is None or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


# --- Stable-Baselines3 ------------------------------------------------------------------------


class MultiDiscreteTask(gym.Env[np.ndarray, np.ndarray]):
    """A MultiDiscrete([2, 3]) task that PPO learns: name the sign of x0 and the largest of x1..x3."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    action_space = gym.spaces.MultiDiscrete([2, 3])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        self._obs = self.np_random.uniform(-1, 1, 4).astype(np.float32)
        return self._obs, {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward = float(action[0] == int(self._obs[0] > 0)) + float(action[1] == int(np.argmax(self._obs[1:])))
        self._t += 1
        self._obs = self.np_random.uniform(-1, 1, 4).astype(np.float32)
        return self._obs, reward, False, self._t >= 32, {}


def sb3_run(name: str, env_id: str, updates: int, fault: str | None, fault_update: int | None) -> Recording:
    """SB3 PPO with the README's callback; Pendulum with the RL Zoo's settings, the others with defaults."""
    import stable_baselines3
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList
    from stable_baselines3.common.env_util import make_vec_env

    from tele_exporter.integrations.sb3 import TelemetryCallback

    rec = Recording(name, f"stable-baselines3 {stable_baselines3.__version__}", fault, fault_update)
    kwargs: dict[str, Any] = {"seed": 0, "device": "cpu"}
    if env_id == "MultiDiscreteTask":
        env = make_vec_env(MultiDiscreteTask, n_envs=4, seed=0)
        kwargs.update(n_steps=256)
    elif env_id == "Pendulum-v1":  # rl-baselines3-zoo hyperparams/ppo.yml
        env = make_vec_env(env_id, n_envs=4, seed=0)
        kwargs.update(
            n_steps=1024,
            gae_lambda=0.95,
            gamma=0.9,
            n_epochs=10,
            ent_coef=0.0,
            learning_rate=1e-3,
            clip_range=0.2,
            use_sde=True,
            sde_sample_freq=4,
        )
    else:
        env = make_vec_env(env_id, n_envs=1, seed=0)
    model = PPO("MlpPolicy", env, **kwargs)
    telemetry = TelemetryCallback(const_labels={"run": name})

    class Recorder(BaseCallback):  # type: ignore[misc]
        """After each train(): keep the scrape; from `fault_update` on, inject the fault."""

        def __init__(self) -> None:
            super().__init__()
            self.trained = 0

        def _on_rollout_start(self) -> None:
            if telemetry.tele is not None and telemetry.tele.snapshot().updates > self.trained:
                self.trained = telemetry.tele.snapshot().updates
                rec.add(scrape(telemetry.tele.registry))
                if fault is not None and fault_update is not None and self.trained >= fault_update:
                    _sb3_fault(model, fault)

        def _on_step(self) -> bool:
            if fault is not None and fault_update is not None and self.trained >= fault_update:
                rewards = self.locals["rewards"]
                if fault == "explode":
                    rewards *= 1000.0  # unnormalised rewards, clipping off (below)
                elif fault == "nan":
                    rewards[:] = np.nan
            return True

        def _on_training_end(self) -> None:
            if telemetry.tele is not None:
                rec.add(scrape(telemetry.tele.registry))

    try:
        model.learn(
            total_timesteps=updates * model.n_steps * model.n_envs, callback=CallbackList([telemetry, Recorder()])
        )
    except Exception as exc:  # the fault killed the trainer, as it would kill a user's: what was published stays
        rec.crashed = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        # As a user's `finally: callback.close()` does: the update train() was in is published
        # (close lingers for its scrape), and the run is not finished, so its absence pages too.
        telemetry._release()
        assert telemetry.tele is not None
        rec.add(scrape(telemetry.tele.registry))
        telemetry.close(linger=0)
        return rec
    telemetry.close(linger=0)
    return rec


def _sb3_fault(model: Any, fault: str) -> None:
    """Turn a healthy SB3 PPO into a faulted one, in place, before its next train()."""
    if fault == "explode":
        model.max_grad_norm = math.inf
    elif fault == "entropy":
        model.ent_coef = -1.0
    elif fault == "kl":
        model.lr_schedule = lambda _: 0.05
        model.n_epochs = 30
    elif fault == "value":
        with torch.no_grad():  # a value head knocked off its targets each update, as a bad value loss would
            for p in model.policy.value_net.parameters():
                p.mul_(10.0).add_(5.0)


# --- a CleanRL-style ppo.py loop (docs/cleanrl.md's lines) --------------------------------------------


def cleanrl_run(name: str, iterations: int, fault: str | None, fault_update: int | None) -> Recording:
    """CleanRL's ppo.py on CartPole (4 envs x 128 steps, 4 epochs of 4 minibatches), instrumented as docs/cleanrl.md."""
    from torch import nn
    from torch.distributions import Categorical

    from tele_exporter import Telemetry

    rec = Recording(name, "CleanRL ppo.py (as docs/cleanrl.md)", fault, fault_update)
    torch.manual_seed(1)
    np.random.seed(1)
    n_envs, n_steps, epochs, minibatches, clip_coef, target_kl = 4, 128, 4, 4, 0.2, None

    def layer(i: int, o: int, std: float = math.sqrt(2)) -> nn.Linear:
        lin = nn.Linear(i, o)
        nn.init.orthogonal_(lin.weight, std)
        nn.init.constant_(lin.bias, 0.0)
        return lin

    class Agent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.critic = nn.Sequential(layer(4, 64), nn.Tanh(), layer(64, 64), nn.Tanh(), layer(64, 1, 1.0))
            self.actor = nn.Sequential(layer(4, 64), nn.Tanh(), layer(64, 64), nn.Tanh(), layer(64, 2, 0.01))

    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1") for _ in range(n_envs)])
    agent = Agent()
    optimizer = torch.optim.Adam(agent.parameters(), lr=2.5e-4, eps=1e-5)
    tele = Telemetry(
        agent,
        heads={"actor": agent.actor},
        groups={"critic": agent.critic},
        action_sizes={"actor": envs.single_action_space.n},
        const_labels={"run": name},
    )
    obs = torch.zeros((n_steps, n_envs, 4))
    actions, logprobs, rewards, dones, values = (torch.zeros((n_steps, n_envs)) for _ in range(5))
    next_obs, next_done = torch.Tensor(envs.reset(seed=1)[0]), torch.zeros(n_envs)
    batch, mb = n_envs * n_steps, n_envs * n_steps // minibatches
    max_grad_norm = 0.5
    for it in range(iterations):
        faulty = fault is not None and fault_update is not None and it >= fault_update
        for step in range(n_steps):
            obs[step], dones[step] = next_obs, next_done
            with torch.no_grad():
                dist = Categorical(logits=agent.actor(next_obs))
                action = dist.sample()
                values[step] = agent.critic(next_obs).flatten()
            actions[step], logprobs[step] = action, dist.log_prob(action)
            o, r, term, trunc, _ = envs.step(action.numpy())
            rewards[step] = torch.tensor(r).view(-1) * (1000.0 if faulty and fault == "explode" else 1.0)
            next_obs, next_done = torch.Tensor(o), torch.Tensor(np.logical_or(term, trunc))
        if faulty and fault == "explode":
            max_grad_norm = math.inf
        with torch.no_grad():
            next_value = agent.critic(next_obs).reshape(1, -1)
            adv = torch.zeros_like(rewards)
            last: torch.Tensor | float = 0.0
            for t in reversed(range(n_steps)):
                nonterminal = 1.0 - (next_done if t == n_steps - 1 else dones[t + 1])
                nextvalues = next_value if t == n_steps - 1 else values[t + 1]
                delta = rewards[t] + 0.99 * nextvalues * nonterminal - values[t]
                adv[t] = last = delta + 0.99 * 0.95 * nonterminal * last
            returns = adv + values
        b_obs, b_lp, b_act = obs.reshape(-1, 4), logprobs.reshape(-1), actions.reshape(-1)
        b_adv, b_ret, b_val = adv.reshape(-1), returns.reshape(-1), values.reshape(-1)
        inds = np.arange(batch)
        with tele.update() as upd:
            for _ in range(epochs):
                np.random.shuffle(inds)
                for start in range(0, batch, mb):
                    i = inds[start : start + mb]
                    dist = Categorical(logits=agent.actor(b_obs[i]))
                    newlogprob, entropy = dist.log_prob(b_act.long()[i]), dist.entropy()
                    newvalue = agent.critic(b_obs[i])
                    logratio = newlogprob - b_lp[i]
                    ratio = logratio.exp()
                    with torch.no_grad():
                        approx_kl = ((ratio - 1) - logratio).mean()
                        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean()
                    upd.observe_clip_fraction(clipfrac)
                    mb_adv = (b_adv[i] - b_adv[i].mean()) / (b_adv[i].std() + 1e-8)
                    pg_loss = torch.max(
                        -mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
                    ).mean()
                    v_loss = 0.5 * ((newvalue.view(-1) - b_ret[i]) ** 2).mean()
                    loss = pg_loss - 0.01 * entropy.mean() + v_loss * 0.5
                    optimizer.zero_grad()
                    loss.backward()
                    upd.clip_grad_norm_(max_grad_norm)
                    optimizer.step()
                    upd.observe_entropy_value(entropy.mean().detach())
                if target_kl is not None and approx_kl > target_kl:
                    upd.early_stop()
                    break
            upd.observe_kl_value(approx_kl)
            upd.observe_explained_variance(b_val, b_ret)
        rec.add(scrape(tele.registry))
    tele.finish()
    rec.add(scrape(tele.registry))
    envs.close()
    tele.close()
    return rec


# --- TorchRL's PPO tutorial, on CartPole as docs/torchrl.md adapts it -------------------------------------


def torchrl_run(name: str, iterations: int) -> Recording:
    """TorchRL ClipPPOLoss + GAE + Collector on CartPole, instrumented with observe_loss (docs/torchrl.md)."""
    import torchrl
    from tensordict.nn import TensorDictModule
    from torch import nn
    from torchrl.collectors import Collector
    from torchrl.envs import GymEnv
    from torchrl.modules import OneHotCategorical, ProbabilisticActor, ValueOperator
    from torchrl.objectives import ClipPPOLoss
    from torchrl.objectives.value import GAE

    from tele_exporter import Telemetry
    from tele_exporter.integrations.torchrl import loss_groups, loss_heads, observe_loss

    rec = Recording(name, f"torchrl {torchrl.__version__}", None, None)
    torch.manual_seed(0)
    env = GymEnv("CartPole-v1")
    env.set_seed(0)
    actor_net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    actor = ProbabilisticActor(
        TensorDictModule(actor_net, in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"],
        spec=env.action_spec,
        distribution_class=OneHotCategorical,
        return_log_prob=True,
    )
    critic = ValueOperator(
        nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)),
        in_keys=["observation"],
    )
    loss = ClipPPOLoss(actor, critic, clip_epsilon=0.2, entropy_coeff=1e-4)
    gae = GAE(gamma=0.99, lmbda=0.95, value_network=critic, average_gae=True)
    optimizer = torch.optim.Adam(loss.parameters(), lr=3e-4)
    frames, minibatch, epochs = 1000, 64, 10
    collector = Collector(
        env, actor, frames_per_batch=frames, total_frames=frames * iterations, auto_register_policy_transforms=False
    )
    tele = Telemetry(
        loss, heads=loss_heads(loss), groups=loss_groups(loss), action_sizes={"actor": 2}, const_labels={"run": name}
    )
    for data in collector:
        with tele.update() as upd:
            for _ in range(epochs):
                with torch.no_grad():
                    gae(data)
                for batch in data.reshape(-1)[torch.randperm(frames)].split(minibatch):
                    out = loss(batch)
                    observe_loss(upd, loss, out)
                    total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
                    optimizer.zero_grad()
                    total.backward()
                    upd.clip_grad_norm_(1.0)
                    optimizer.step()
        rec.add(scrape(tele.registry))
    tele.finish()
    rec.add(scrape(tele.registry))
    collector.shutdown()
    tele.close()
    return rec


# --- RLlib's PPO (new API stack), two learner actors, as docs/rllib.md instruments it -------------


def rllib_run(name: str, iterations: int, learners: int = 2) -> Recording:
    """RLlib PPO on CartPole with `learners` learner actors under integrations.rllib.instrument
    (docs/rllib.md). Each learner serves its own /metrics; every learner is scraped over HTTP after
    each algo.train(), and again during algo.stop()'s linger until each says its run finished.
    tele_world_size is kept: the rank rules read it."""
    import threading
    import urllib.request

    import ray
    from ray.rllib.algorithms.ppo import PPOConfig

    from tele_exporter.integrations.rllib import instrument

    def scrape_all(ports: list[int]) -> Samples:
        out: Samples = {}
        for port in ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
                out.update(parse(reply.read().decode(), keep=frozenset({"tele_world_size"})))
        return out

    rec = Recording(name, f"ray[rllib] {ray.__version__}", None, None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        config = (
            PPOConfig()
            .environment("CartPole-v1")
            .env_runners(num_env_runners=0)
            .learners(num_learners=learners)
            .training(
                train_batch_size_per_learner=1000,
                minibatch_size=64,
                num_epochs=10,
                lr=3e-4,
                grad_clip=0.5,
                grad_clip_by="global_norm",
            )
            .debugging(seed=0)
        )
        instrument(config, base_port=0, linger=60.0, const_labels={"run": name})  # any free ports
        algo = config.build_algo()
        ports = [r.get() for r in algo.learner_group.foreach_learner(lambda learner: learner.tele_server.port)]
        for _ in range(iterations):
            algo.train()
            rec.add(scrape_all(ports))
        stopping = threading.Thread(target=algo.stop)
        stopping.start()
        finished: Samples = {}
        while stopping.is_alive():  # the linger: each learner waits for a scrape of its finished update
            try:
                got = scrape_all(ports)
            except OSError:
                break
            if sum(v for k, v in got.items() if k.startswith("tele_run_finished{")) >= learners:
                finished = got
                break
            time.sleep(0.2)
        stopping.join()
        if not finished:
            raise RuntimeError(f"{name}: no scrape saw every learner's run finished during algo.stop()")
        rec.add(finished)
    finally:
        ray.shutdown()
    return rec


# --- the scenarios -------------------------------------------------------------------------------

FAULT_AT = 12

SCENARIOS: dict[str, Callable[[], Recording]] = {
    "sb3-cartpole": lambda: sb3_run("sb3-cartpole", "CartPole-v1", 40, None, None),
    "sb3-multidiscrete": lambda: sb3_run("sb3-multidiscrete", "MultiDiscreteTask", 40, None, None),
    "sb3-pendulum": lambda: sb3_run("sb3-pendulum", "Pendulum-v1", 25, None, None),
    **{
        f"sb3-cartpole-{fault}": (lambda f=fault: sb3_run(f"sb3-cartpole-{f}", "CartPole-v1", 24, f, FAULT_AT))
        for fault in ("explode", "nan", "entropy", "kl", "value")
    },
    "cleanrl-cartpole": lambda: cleanrl_run("cleanrl-cartpole", 60, None, None),
    "cleanrl-cartpole-explode": lambda: cleanrl_run("cleanrl-cartpole-explode", 30, "explode", FAULT_AT),
    "torchrl-cartpole": lambda: torchrl_run("torchrl-cartpole", 40),
    "rllib-cartpole": lambda: rllib_run("rllib-cartpole", 40),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="scenario names (default: all)")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.only or list(SCENARIOS):
        started = time.monotonic()
        rec = SCENARIOS[name]()
        path = rec.save(args.out)
        print(f"{name}: {len(rec.scrapes)} scrapes in {time.monotonic() - started:.0f} s -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
