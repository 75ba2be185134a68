"""What instrumenting RLlib's PPO costs: plain and instrumented training iterations, interleaved in one run.

Two algorithms with the same config and seed (one local learner, CartPole, no remote env
runners, RLlib's global-norm clip) train side by side, so both see the same episodes and do the
same work; each round trains one iteration of each, in an order that alternates every round.
It prints the instrumented/plain ratio of the whole iteration (`Algorithm.train()`) and of the
learner's update alone, as the median of the rounds' ratios and as the ratio of the totals,
with the load average beside them (the machine is shared: read the ratio with it).

    python benchmarks/rllib_overhead.py [--rounds 20] [--batch 1000] [--minibatch 128] [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.rllib.algorithms.ppo import PPOConfig

from tele_exporter.integrations.rllib import instrument

VARIANTS = ("plain", "instrumented")
RAY_CANNOT_START = "Ray cannot start here"


def build(variant: str, args: argparse.Namespace) -> Any:
    config = (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=0)
        .training(
            train_batch_size_per_learner=args.batch,
            minibatch_size=args.minibatch,
            num_epochs=args.epochs,
            grad_clip=0.5,
            grad_clip_by="global_norm",
        )
        .debugging(seed=0)
    )
    if variant == "instrumented":
        instrument(config, base_port=0)  # any free port: the learner serves /metrics as it would in a real run
    return config.build_algo()


def timed_updates(algo: Any) -> list[float]:
    """Record the local learner's `update` wall times (RLlib calls it through the instance)."""
    learner = algo.learner_group._learner
    update: Callable[..., Any] = learner.update
    times: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return update(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)

    learner.update = timed
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="iterations of each variant, interleaved")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations of each variant first")
    parser.add_argument("--batch", type=int, default=1000, help="train_batch_size_per_learner")
    parser.add_argument("--minibatch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as exc:
        raise SystemExit(f"{RAY_CANNOT_START}: {type(exc).__name__}: {exc}") from None
    try:
        algos = {v: build(v, args) for v in VARIANTS}
        updates = {v: timed_updates(a) for v, a in algos.items()}
        for _ in range(args.warmup):
            for algo in algos.values():
                algo.train()
        for times in updates.values():
            times.clear()
        iterations: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for round_ in range(args.rounds):
            for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
                start = time.perf_counter()
                algos[variant].train()
                iterations[variant].append(time.perf_counter() - start)
        load = os.getloadavg()
        for what, times in (("iteration", iterations), ("learner update", updates)):
            plain, inst = times["plain"], times["instrumented"]
            median = statistics.median(i / p for i, p in zip(inst, plain, strict=True))
            total = sum(inst) / sum(plain)
            print(
                f"{what}: plain {statistics.median(plain) * 1e3:.1f} ms, instrumented "
                f"{statistics.median(inst) * 1e3:.1f} ms (medians of {len(plain)}); ratio instrumented/plain "
                f"{median:.3f} median of rounds, {total:.3f} of totals; load average {load[0]:.2f} {load[1]:.2f} "
                f"{load[2]:.2f} on {os.cpu_count()} CPUs"
            )
        for algo in algos.values():
            algo.stop()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
