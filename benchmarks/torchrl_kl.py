"""What the TorchRL integration's KL costs, against the second actor pass it avoids, as ratios from one run.

Each round runs the same ClipPPOLoss optimisation (epochs over minibatches of
synthetic CartPole-sized data, 64-unit actor and critic) three times from the
same initial policy, in an order that rotates every round: plain (torch's clip, no
telemetry), `observe_loss` (k3 from the loss's own mean_ratio and kl_approx),
and telemetry with a second actor pass for the per-sample log-ratio and
`observe_kl`, which is what the KL would cost if TorchRL allowed nothing better.

    python benchmarks/torchrl_kl.py [--rounds 20] [--minibatches 8] [--epochs 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import OneHot
from torchrl.modules import OneHotCategorical, ProbabilisticActor, ValueOperator
from torchrl.objectives import ClipPPOLoss

from tele_exporter import Telemetry
from tele_exporter.integrations.torchrl import loss_heads, observe_loss

VARIANTS = ("plain", "observe_loss", "extra_pass")
OBS, ACTIONS, MINIBATCH = 4, 2, 64


def build() -> tuple[ClipPPOLoss, ProbabilisticActor]:
    spec = OneHot(ACTIONS)
    actor = ProbabilisticActor(
        TensorDictModule(
            nn.Sequential(nn.Linear(OBS, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, ACTIONS)),
            in_keys=["observation"],
            out_keys=["logits"],
        ),
        in_keys=["logits"],
        spec=spec,
        distribution_class=OneHotCategorical,
        return_log_prob=True,
    )
    critic = ValueOperator(
        nn.Sequential(nn.Linear(OBS, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)),
        in_keys=["observation"],
    )
    return ClipPPOLoss(actor, critic, clip_epsilon=0.2, entropy_coeff=0.01), actor


def data(actor: ProbabilisticActor, n: int) -> TensorDict:
    td = TensorDict({"observation": torch.randn(n, OBS)}, batch_size=[n])
    with torch.no_grad():
        actor(td)
    td["advantage"] = torch.randn(n, 1)
    td["value_target"] = torch.randn(n, 1)
    return td


def run(variant: str, loss: ClipPPOLoss, actor: ProbabilisticActor, batch: TensorDict, epochs: int) -> float:
    optimizer = torch.optim.Adam(loss.parameters(), lr=3e-4)
    tele = Telemetry(loss, heads=loss_heads(loss)) if variant != "plain" else None
    start = time.perf_counter()
    upd: Any = tele.update().__enter__() if tele is not None else None
    for _ in range(epochs):
        for mb in batch[torch.randperm(batch.shape[0])].split(MINIBATCH):
            out = loss(mb)
            if variant == "observe_loss":
                observe_loss(upd, loss, out)
            elif variant == "extra_pass":
                with torch.no_grad():
                    dist = actor.get_dist(mb.clone(False))
                    r = dist.log_prob(mb["action"]) - mb[loss.tensor_keys.sample_log_prob]
                upd.observe_kl({"actor": r})
                upd.observe_clip_fraction(out["clip_fraction"])
            total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
            optimizer.zero_grad()
            total.backward()
            if upd is None:
                torch.nn.utils.clip_grad_norm_(loss.parameters(), 0.5)
            else:
                upd.clip_grad_norm_(0.5)
            optimizer.step()
    if upd is not None:
        upd.__exit__(None, None, None)
    elapsed = time.perf_counter() - start
    if tele is not None:
        tele.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--minibatches", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batch = data(build()[1], MINIBATCH * args.minibatches)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rnd in range(args.rounds + 1):
        for i in range(len(VARIANTS)):
            variant = VARIANTS[(rnd + i) % len(VARIANTS)]
            torch.manual_seed(0)  # the same initial policy every run
            elapsed = run(variant, *build(), batch, args.epochs)
            if rnd:  # round 0 warms up
                times[variant].append(elapsed)
    plain = statistics.median(times["plain"])
    for variant in VARIANTS[1:]:
        pairs = statistics.median(t / p for t, p in zip(times[variant], times["plain"], strict=True))
        print(f"{variant}/plain: {statistics.median(times[variant]) / plain:.3f} median, {pairs:.3f} median of pairs")


if __name__ == "__main__":
    main()
