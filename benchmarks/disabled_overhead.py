"""Overhead of disabled and enabled telemetry against a plain PPO loop, as ratios from one interleaved run.

Each round runs the same PPO optimisation (clipped surrogate, epochs over
minibatches, a small two-head actor-critic on synthetic data) three times from
the same policy and optimizer state, in an order that rotates every round:
plain (torch.nn.utils.clip_grad_norm_, the loop's own KL), with
`Telemetry(..., enabled=False)`, and with telemetry enabled. The work is the
same, so the ratios are telemetry's alone; disabled should be ~1.00x.

    python benchmarks/disabled_overhead.py [--rounds 30] [--minibatches 8] [--epochs 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from tele_exporter import Telemetry, Update

VARIANTS = ("plain", "disabled", "enabled")


class ActorCritic(nn.Module):
    """A trunk, two action heads and a critic."""

    def __init__(self, obs: int = 32, width: int = 128) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.op = nn.Linear(width, 8)
        self.slot = nn.Linear(width, 6)
        self.critic = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.trunk(x)
        return self.op(h), self.slot(h), self.critic(h).squeeze(-1)


def _log_prob(policy: ActorCritic, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
    op, slot, value = policy(obs)
    logp = torch.distributions.Categorical(logits=op).log_prob(actions[:, 0])
    return logp + torch.distributions.Categorical(logits=slot).log_prob(actions[:, 1]), value


def optimise(
    policy: ActorCritic, optimizer: torch.optim.Optimizer, data: dict[str, Tensor], upd: Update | None, epochs: int
) -> None:
    """CleanRL-style epochs over minibatches; `upd` None is the plain loop."""
    params = list(policy.parameters())
    for _ in range(epochs):
        for mb in torch.randperm(data["obs"].shape[0]).view(-1, 64):
            new_logp, value = _log_prob(policy, data["obs"][mb], data["actions"][mb])
            log_ratio = new_logp - data["logp"][mb]
            ratio = log_ratio.exp()
            adv = data["adv"][mb]
            pg = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
            loss = pg + 0.5 * (value - data["ret"][mb]).pow(2).mean()
            with torch.no_grad():
                kl = ((ratio - 1) - log_ratio).mean()
                clipped = ((ratio - 1).abs() > 0.2).float().mean()
            optimizer.zero_grad()
            loss.backward()
            if upd is None:
                nn.utils.clip_grad_norm_(params, 0.5)
            else:
                upd.clip_grad_norm_(0.5)
                upd.observe_kl_value(kl)
                upd.observe_clip_fraction(clipped)
            optimizer.step()


def run(rounds: int, minibatches: int, epochs: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per variant and the ratios to plain over `rounds` interleaved rounds."""
    torch.manual_seed(0)
    policy = ActorCritic()
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-4)
    heads = {"op": policy.op, "slot": policy.slot}
    teles = {"disabled": Telemetry(policy, heads, enabled=False), "enabled": Telemetry(policy, heads, enabled=True)}
    n = 64 * minibatches
    with torch.no_grad():
        obs = torch.randn(n, 32)
        actions = torch.stack([torch.randint(0, 8, (n,)), torch.randint(0, 6, (n,))], dim=1)
        data = {"obs": obs, "actions": actions, "logp": _log_prob(policy, obs, actions)[0]}
        data["adv"], data["ret"] = torch.randn(n), torch.randn(n)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def variant(name: str) -> Callable[[], None]:
        def go() -> None:
            ctx: AbstractContextManager[Any] = teles[name].update() if name in teles else nullcontext()
            with ctx as upd:
                optimise(policy, optimizer, data, upd, epochs)

        return go

    for i in range(warmup + rounds):
        start = copy.deepcopy(policy.state_dict()), copy.deepcopy(optimizer.state_dict())
        order = VARIANTS[i % 3 :] + VARIANTS[: i % 3]
        for name in order:
            policy.load_state_dict(start[0])
            optimizer.load_state_dict(start[1])
            torch.manual_seed(i)
            t0 = time.perf_counter()
            variant(name)()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    for tele in teles.values():
        tele.close()
    medians = {f"{v}_s": statistics.median(times[v]) for v in VARIANTS}
    pairs = {v: statistics.median(t / p for t, p in zip(times[v], times["plain"], strict=True)) for v in VARIANTS[1:]}
    return (
        medians
        | {f"{v}_ratio_median_pair": r for v, r in pairs.items()}
        | {f"{v}_ratio_total": sum(times[v]) / sum(times["plain"]) for v in VARIANTS[1:]}
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds")
    parser.add_argument("--minibatches", type=int, default=8, help="minibatches of 64 per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per update")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = run(args.rounds, args.minibatches, args.epochs)
    print(
        f"disabled overhead: {args.rounds} rounds x {args.epochs} epochs x {args.minibatches} minibatches, "
        f"torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(
        f"medians: plain {r['plain_s'] * 1e3:.2f} ms, disabled {r['disabled_s'] * 1e3:.2f} ms, "
        f"enabled {r['enabled_s'] * 1e3:.2f} ms"
    )
    for v in VARIANTS[1:]:
        print(f"ratio {v}/plain: median of pairs {r[f'{v}_ratio_median_pair']:.4f}, total {r[f'{v}_ratio_total']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
