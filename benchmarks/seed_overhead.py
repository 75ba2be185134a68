"""Cost of watching seeds (TELE-557) per backward pass, as a ratio from one run (target <= 1.05x with 4 seeds).

A host MLP with `seeds` residual seeds (Linear-ReLU-Linear, alpha-blended) trains
with SGD: forward, backward, step. Two copies of the same host train side by side,
one plain and one with every seed watched by `tele.watch_seed(seed, host=host, ...)`,
in alternating single steps on the same data, so the ratio is the watch's
alone: per backward pass, tensor hooks mark each parameter's gradient and one
engine callback takes one fused norm per host; the opt-in backward-gain probe
(`backward_gain=True`) adds forward hooks and two tensor hooks per seed. The
update's publish (once per PPO update, not per pass) is timed separately. `--floor` also times the least any exact
per-pass measurement must add: one fused norm of every host and seed gradient after
each backward, inline, with no hook at all. Torch runs on one thread, so the
training thread's CPU time (`--clock thread`, the default) is the step's work and
holds still on a shared machine where wall time (`--clock wall`) does not. On a GPU
(`--device cuda`) each step ends with a synchronize and is timed on the wall clock.

    python benchmarks/seed_overhead.py [--seeds 4] [--width 256] [--batch 256] [--updates 10] [--steps 25]
                                       [--clock thread|wall] [--device cpu|cuda] [--floor]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from tele_exporter import Telemetry


class Seed(nn.Module):
    """A residual seed: x + alpha * up(relu(down(x)))."""

    def __init__(self, width: int, inner: int, alpha: float = 0.5) -> None:
        super().__init__()
        self.down = nn.Linear(width, inner)
        self.up = nn.Linear(inner, width)
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha * self.up(torch.relu(self.down(x)))


class Host(nn.Module):
    """An MLP whose hidden layers are each followed by a seed."""

    def __init__(self, width: int, seeds: int) -> None:
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(max(seeds, 1)))
        self.seeds = nn.ModuleList(Seed(width, width // 8) for _ in range(seeds))
        self.out = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        for i, layer in enumerate(self.layers):
            h = torch.tanh(layer(h))
            if i < len(self.seeds):
                h = self.seeds[i](h)
        out: Tensor = self.out(h)
        return out


CLOCKS: dict[str, Callable[[], float]] = {"thread": time.thread_time, "wall": time.perf_counter}


def _step(host: Host, optim: torch.optim.Optimizer, x: Tensor, y: Tensor, clock: Callable[[], float]) -> float:
    """Seconds of one training step: forward, backward, SGD step (until the GPU has finished it)."""
    t0 = clock()
    optim.zero_grad(set_to_none=True)
    (host(x) - y).pow(2).mean().backward()
    optim.step()
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return clock() - t0


def run(
    seeds: int,
    width: int,
    batch: int,
    updates: int,
    steps: int,
    gain: bool,
    clock: Callable[[], float],
    device: str = "cpu",
) -> dict[str, float]:
    """Alternate single steps of a plain and a watched copy of one host; returns medians and ratios."""
    torch.manual_seed(0)
    plain_host = Host(width, seeds).to(device)
    watched_host = copy.deepcopy(plain_host)
    policy = nn.Linear(1, 1)
    tele = Telemetry(policy, heads={"op": policy})
    for i, seed in enumerate(watched_host.seeds):
        tele.watch_seed(seed, host=watched_host, env="0", slot=f"r0c{i}", backward_gain=gain)
    optims = {
        "plain": torch.optim.SGD(plain_host.parameters(), lr=1e-3),
        "watched": torch.optim.SGD(watched_host.parameters(), lr=1e-3),
    }
    hosts = {"plain": plain_host, "watched": watched_host}
    x, y = torch.randn(batch, 32, device=device), torch.randn(batch, 1, device=device)
    times: dict[str, list[float]] = {"plain": [], "watched": []}
    publish: list[float] = []
    for u in range(updates + 1):
        with tele.update():
            for k in range(steps):
                for name in ("plain", "watched") if (u + k) % 2 else ("watched", "plain"):
                    seconds = _step(hosts[name], optims[name], x, y, clock)
                    if u:
                        times[name].append(seconds)
            t0 = clock()
        if u:
            publish.append(clock() - t0)
    pairs = [w / p for w, p in zip(times["watched"], times["plain"], strict=True)]
    return {
        "plain_ms": 1e3 * statistics.median(times["plain"]),
        "watched_ms": 1e3 * statistics.median(times["watched"]),
        "ratio_median_pair": statistics.median(pairs),
        "ratio_total": sum(times["watched"]) / sum(times["plain"]),
        "publish_ms": 1e3 * statistics.median(publish),
    }


def floor(seeds: int, width: int, batch: int, steps: int, clock: Callable[[], float], device: str) -> float:
    """Median pair ratio of a step followed by one fused norm of all its gradients (no hooks) over a plain step."""
    torch.manual_seed(0)
    hosts = {"plain": Host(width, seeds).to(device)}
    hosts["normed"] = copy.deepcopy(hosts["plain"])
    optims = {name: torch.optim.SGD(host.parameters(), lr=1e-3) for name, host in hosts.items()}
    x, y = torch.randn(batch, 32, device=device), torch.randn(batch, 1, device=device)
    params = list(hosts["normed"].parameters())
    times: dict[str, list[float]] = {"plain": [], "normed": []}
    for k in range(2 * steps + 20):
        for name in ("plain", "normed") if k % 2 else ("normed", "plain"):
            host, optim = hosts[name], optims[name]
            t0 = clock()
            optim.zero_grad(set_to_none=True)
            (host(x) - y).pow(2).mean().backward()
            if name == "normed":
                with torch.no_grad():
                    torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None]))
            optim.step()
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            if k >= 20:
                times[name].append(clock() - t0)
    return statistics.median(n / p for n, p in zip(times["normed"], times["plain"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="thread")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (timed on the wall clock)")
    parser.add_argument("--floor", action="store_true", help="also time one fused norm per pass with no hooks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = CLOCKS["wall" if args.device.startswith("cuda") else args.clock]
    modes = ((False, "ratio only (watch_seed's default)"), (True, "ratio and backward gain (backward_gain=True)"))
    for gain, what in modes:
        res = run(args.seeds, args.width, args.batch, args.updates, args.steps, gain, clock, args.device)
        print(f"{what}:")
        print(f"  host step without watched seeds: {res['plain_ms']:.3f} ms")
        print(f"  host step with {args.seeds} watched seeds: {res['watched_ms']:.3f} ms")
        print(f"  seed watch ratio per backward pass: {res['ratio_median_pair']:.4f}x median of pairs, ", end="")
        print(f"{res['ratio_total']:.4f}x total (target <= 1.05x)")
        print(f"  publish at the end of an update of {args.steps} passes: {res['publish_ms']:.3f} ms")
    if args.floor:
        ratio = floor(args.seeds, args.width, args.batch, args.updates * args.steps, clock, args.device)
        print(f"floor: one fused norm of every host and seed gradient per pass, no hooks: {ratio:.4f}x median of pairs")


if __name__ == "__main__":
    main()
