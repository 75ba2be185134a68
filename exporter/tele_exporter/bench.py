"""`tele-exporter bench`: telemetry's step overhead, counted and then timed side by side in one run.

First the counts, which are the same on any machine: kernel-launching ops and host
reads per step of each per-step call, against torch's own where there is one, and
of one publish. Then three variants train the same multi-head policy on the same
data, interleaved round by round so machine noise hits them alike: a plain
torch.nn.utils.clip_grad_norm_ step, an Update.clip_grad_norm_ step, and the
naive per-head `.item()` loop users write today. Printed as ratios to plain.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .measure.dispatch_counter import DispatchCounter
from .telemetry.telemetry import Telemetry, Update

HEADS = ("op", "slot", "blueprint", "style", "tempo", "alpha_target", "alpha_speed", "alpha_curve")


class BenchPolicy(nn.Module):
    """A PPO-sized factored policy: an MLP trunk, eight action heads and a value head."""

    def __init__(self, obs: int, hidden: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.ModuleDict({h: nn.Linear(hidden, 8) for h in HEADS})
        self.value = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        z = self.trunk(x)
        logits = torch.stack([head(z) for head in self.heads.values()])
        loss: Tensor = logits.logsumexp(-1).mean() + self.value(z).pow(2).mean()
        return loss


@dataclass
class Variant:
    """One way of clipping, with its per-step timings of each round."""

    name: str
    policy: BenchPolicy
    clip: Callable[[], object]
    clip_seconds: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


def _naive_head_norms(policy: BenchPolicy) -> dict[str, float]:
    """What users write today: a host sync per head per step."""
    out = {}
    for name, head in policy.heads.items():
        squares = [p.grad.norm() ** 2 for p in head.parameters() if p.grad is not None]
        out[name] = float(torch.stack(squares).sum().sqrt().item()) if squares else float("nan")
    return out


def run_bench(steps: int, rounds: int, hidden: int, batch: int, device: str, max_norm: float = 0.5) -> Result:
    """Time the three variants, interleaved; each round is one published PPO update."""
    torch.manual_seed(0)
    base = BenchPolicy(64, hidden).to(device)
    data = torch.randn(batch, 64, device=device)
    policies = [BenchPolicy(64, hidden).to(device) for _ in range(3)]
    for p in policies:
        p.load_state_dict(base.state_dict())
    tele = Telemetry(policies[1], heads=dict(policies[1].heads.items()))
    updates: list[Update] = []
    variants = [
        Variant("plain", policies[0], lambda: torch.nn.utils.clip_grad_norm_(policies[0].parameters(), max_norm)),
        Variant("telemetry", policies[1], lambda: updates[-1].clip_grad_norm_(max_norm)),
        Variant(
            "naive",
            policies[2],
            lambda: (
                torch.nn.utils.clip_grad_norm_(policies[2].parameters(), max_norm),
                _naive_head_norms(policies[2]),
            ),
        ),
    ]
    optims = [torch.optim.Adam(v.policy.parameters(), lr=1e-4) for v in variants]

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step(v: Variant, optim: torch.optim.Optimizer) -> float:
        optim.zero_grad(set_to_none=True)
        v.policy(data).backward()
        t0 = time.perf_counter()
        v.clip()
        clip_t = time.perf_counter() - t0
        optim.step()
        return clip_t

    publish: list[float] = []
    for r in range(3 + rounds):  # three warm-up rounds: allocator, kernels, plans
        upd = tele.update().__enter__()
        updates.append(upd)
        for v, optim in zip(variants, optims, strict=True):
            sync()
            t0 = time.perf_counter()
            clip_total = sum(step(v, optim) for _ in range(steps))
            sync()
            if r >= 3:
                v.step_seconds.append((time.perf_counter() - t0) / steps)
                v.clip_seconds.append(clip_total / steps)
        t0 = time.perf_counter()
        upd.__exit__(None, None, None)
        if r >= 3:
            publish.append(time.perf_counter() - t0)
    tele.close()
    return Result(variants, publish, steps)


def _counted(fn: Callable[[], object]) -> DispatchCounter:
    with DispatchCounter() as counter:
        fn()
    return counter


def count_calls(hidden: int, batch: int, device: str) -> list[tuple[str, DispatchCounter, DispatchCounter | None]]:
    """Launches and host reads of each per-step call in the steady state, and of one 32-step publish."""
    torch.manual_seed(0)
    policy = BenchPolicy(64, hidden).to(device)
    twin = BenchPolicy(64, hidden).to(device)
    data = torch.randn(batch, 64, device=device)
    tele = Telemetry(policy, heads=dict(policy.heads.items()), groups={"value": policy.value})
    log_ratio = {h: 0.01 * torch.randn(batch, device=device) for h in HEADS}
    entropy = {h: torch.rand(batch, device=device) for h in HEADS}

    def backward(p: BenchPolicy) -> None:
        p.zero_grad(set_to_none=True)
        p(data).backward()

    out: list[tuple[str, DispatchCounter, DispatchCounter | None]] = []
    upd = tele.update().__enter__()
    for step in range(32):
        backward(policy)
        backward(twin)
        clip = _counted(lambda: upd.clip_grad_norm_(0.5))
        torch_clip = _counted(lambda: torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5))
        if step == 31:
            backward(policy)
            grads: list[Tensor] = [p.grad for p in policy.parameters() if p.grad is not None]

            def total_norm(grads: list[Tensor] = grads) -> Tensor:
                return torch.nn.utils.get_total_norm(grads)

            out.append(("upd.clip_grad_norm_", clip, torch_clip))
            out.append(
                (
                    "upd.observe_gradients",
                    _counted(upd.observe_gradients),
                    _counted(total_norm),
                )
            )
            out.append(("upd.observe_kl (8 heads)", _counted(lambda: upd.observe_kl(log_ratio)), None))
            out.append(("upd.observe_entropy (8 heads)", _counted(lambda: upd.observe_entropy(entropy)), None))
            out.append(("upd.observe_ratios (8 heads)", _counted(lambda: upd.observe_ratios(log_ratio)), None))
    out.append(("publish (32 steps, once per update)", _counted(lambda: upd.__exit__(None, None, None)), None))
    tele.close()
    return out


def count_report(counts: list[tuple[str, DispatchCounter, DispatchCounter | None]]) -> str:
    """The counts as a table: ours, and torch's where telemetry replaces a torch call."""
    lines = [f"{'call':<38}{'launches':>9}{'reads':>7}{'torch launches':>16}"]
    for name, ours, theirs in counts:
        torch_col = f"{theirs.launches:>16}" if theirs is not None else f"{'-':>16}"
        lines.append(f"{name:<38}{ours.launches:>9}{ours.reads:>7}{torch_col}")
    return "\n".join(lines)


@dataclass
class Result:
    """Timings of a bench run: the variants and the once-per-update publish."""

    variants: list[Variant]
    publish_seconds: list[float]
    steps: int


def report(result: Result) -> str:
    """A table of median per-step times and their ratios to the plain step, then publish cost."""
    variants = result.variants
    plain = variants[0]
    p_step, p_clip = statistics.median(plain.step_seconds), statistics.median(plain.clip_seconds)
    lines = [f"{'variant':<12}{'step ms':>10}{'ratio':>9}{'clip ms':>10}{'ratio':>9}"]
    for v in variants:
        step, clip = statistics.median(v.step_seconds), statistics.median(v.clip_seconds)
        lines.append(f"{v.name:<12}{step * 1e3:>10.3f}{step / p_step:>9.3f}{clip * 1e3:>10.3f}{clip / p_clip:>9.3f}")
    pub = statistics.median(result.publish_seconds)
    telemetry_step = statistics.median(variants[1].step_seconds)
    lines.append(
        f"publish (once per update of {result.steps} steps): {pub * 1e3:.3f} ms; "
        f"update with publish / plain update: {(telemetry_step * result.steps + pub) / (p_step * result.steps):.3f}"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per round (one PPO update)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds; medians are reported")
    parser.add_argument("--hidden", type=int, default=256, help="trunk width")
    parser.add_argument("--batch", type=int, default=256, help="minibatch size")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"tele-exporter bench: {args.rounds} rounds x {args.steps} steps, hidden={args.hidden}, "
        f"batch={args.batch}, device={args.device}, torch {torch.__version__}, load average "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print("counted (kernel-launching aten ops and per-value host reads, steady state):")
    print(count_report(count_calls(args.hidden, args.batch, args.device)))
    result = run_bench(args.steps, args.rounds, args.hidden, args.batch, args.device)
    print("step = zero_grad + forward + backward + clip + optimizer.step; clip = the clipping call alone")
    print(report(result))
    return 0
