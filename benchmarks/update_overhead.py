"""Whole-update overhead of telemetry on the demo trainer, as a ratio from one run (target <= 1.01x).

Each round, the demo trainer collects one rollout, then runs the same PPO
optimisation (GAE + clipped-surrogate epochs over minibatches, KL early stop)
twice from the same policy, optimizer and generator state, in alternating
order: once inside `tele.update()` (Update.clip_grad_norm_ per step,
observe_kl per epoch, the publish on exit), once with every telemetry call
replaced by what a trainer does without it (torch.nn.utils.clip_grad_norm_, its
own approx KL for the early stop, nothing published). Both variants do the same
work on the same data, so the ratio is telemetry's alone. The whole-update
ratio adds the rollout (timed once; its environments run without seed probes)
to both sides.

    python benchmarks/update_overhead.py [--updates 30] [--envs 4] [--steps 16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from tele_exporter.demo.ppo import DemoConfig, Trainer
from tele_exporter.stats import approx_kl


class PlainUpdate:
    """Stands in for tele.update(): plain clipping and the trainer's own KL, nothing recorded or observed."""

    def __init__(self, trainer: Trainer) -> None:
        self._params = list(trainer.policy.parameters())
        self.stopped_early = False

    def __enter__(self) -> PlainUpdate:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(self._params, max_norm)

    def observe_kl(self, log_ratio: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        return approx_kl(log_ratio, masks)

    def early_stop(self) -> None:
        self.stopped_early = True

    def _unobserved(self, *args: object, **kwargs: object) -> Tensor:
        """The policy-health observations: a loop without telemetry computes none of them."""
        return torch.zeros(())

    observe_entropy = observe_explained_variance = observe_advantages = observe_ratios = observe_log_probs = _unobserved


def _state(trainer: Trainer) -> tuple[dict[str, Any], dict[str, Any], Tensor]:
    return (
        copy.deepcopy(trainer.policy.state_dict()),
        copy.deepcopy(trainer.optimizer.state_dict()),
        trainer.generator.get_state(),
    )


def _restore(trainer: Trainer, state: tuple[dict[str, Any], dict[str, Any], Tensor]) -> None:
    trainer.policy.load_state_dict(state[0])
    trainer.optimizer.load_state_dict(state[1])
    trainer.generator.set_state(state[2])


def run(updates: int, envs: int, steps: int, warmup: int = 2) -> dict[str, float]:
    """Time `updates` rounds after `warmup`; returns median seconds and ratios."""
    trainer = Trainer(DemoConfig(updates=0, envs=envs, steps=steps, seed=0))
    for env in trainer.vec.envs:
        env.tele = None
    times: dict[str, list[float]] = {"rollout": [], "telemetry": [], "plain": []}

    def telemetry() -> None:
        with trainer.tele.update() as upd:
            trainer._optimise(upd, rollout, False)

    def plain() -> None:
        trainer._optimise(PlainUpdate(trainer), rollout, False)  # type: ignore[arg-type]

    try:
        for i in range(warmup + updates):
            t0 = time.perf_counter()
            rollout = trainer.rollout()
            rollout_s = time.perf_counter() - t0
            start = _state(trainer)
            order: list[tuple[str, Callable[[], None]]] = [("telemetry", telemetry), ("plain", plain)]
            if i % 2:
                order.reverse()
            for k, (name, fn) in enumerate(order):
                if k:
                    _restore(trainer, start)
                t0 = time.perf_counter()
                fn()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
            if i >= warmup:
                times["rollout"].append(rollout_s)
    finally:
        trainer.close()
    roll, tele_s, plain_s = (sum(times[k]) for k in ("rollout", "telemetry", "plain"))
    pairs = [t / p for t, p in zip(times["telemetry"], times["plain"], strict=True)]
    return {
        "rollout_s": statistics.median(times["rollout"]),
        "telemetry_s": statistics.median(times["telemetry"]),
        "plain_s": statistics.median(times["plain"]),
        "optimise_ratio_median_pair": statistics.median(pairs),
        "optimise_ratio_total": tele_s / plain_s,
        "update_ratio_total": (roll + tele_s) / (roll + plain_s),
        "optimise_ratio_fastest": min(times["telemetry"]) / min(times["plain"]),
        "update_ratio_fastest": (min(times["rollout"]) + min(times["telemetry"]))
        / (min(times["rollout"]) + min(times["plain"])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=30, help="timed rounds")
    parser.add_argument("--envs", type=int, default=4, help="demo environments")
    parser.add_argument("--steps", type=int, default=16, help="environment steps per env per update")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = run(args.updates, args.envs, args.steps)
    print(
        f"update overhead: {args.updates} updates x (envs={args.envs}, steps={args.steps}), "
        f"torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(
        f"medians: rollout {r['rollout_s'] * 1e3:.1f} ms, optimisation with telemetry {r['telemetry_s'] * 1e3:.1f} ms, "
        f"plain {r['plain_s'] * 1e3:.1f} ms"
    )
    print(
        f"optimisation ratio telemetry/plain: median of pairs {r['optimise_ratio_median_pair']:.4f}, "
        f"total {r['optimise_ratio_total']:.4f}"
    )
    print(
        f"whole-update ratio telemetry/plain (rollout + optimisation): total {r['update_ratio_total']:.4f}, "
        f"fastest rounds {r['update_ratio_fastest']:.4f} (optimisation alone {r['optimise_ratio_fastest']:.4f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
