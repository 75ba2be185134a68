"""The synthetic seed-management task: host networks with slots where seeds grow.

Each environment owns a small host MLP learning a fixed random regression task.
Its hidden layers have slots; the agent germinates seeds there (small residual
modules blended in with alpha), blends, prunes and fossilizes them. The host
trains one SGD step per environment step; the reward is the validation
improvement minus a parameter cost. Live seeds are watched by Telemetry.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..telemetry.telemetry import SeedWatch, Telemetry


class Op(enum.IntEnum):
    """The op head's choices: WAIT, GERMINATE, SET_ALPHA_TARGET, PRUNE, FOSSILIZE, ADVANCE."""

    WAIT = 0
    GERMINATE = 1
    SET_ALPHA_TARGET = 2
    PRUNE = 3
    FOSSILIZE = 4
    ADVANCE = 5


class Stage(enum.IntEnum):
    """Lifecycle of a slot."""

    EMPTY = 0
    TRAINING = 1
    BLENDING = 2
    PRUNING = 3
    FOSSILIZED = 4


BLUEPRINT_WIDTHS = (4, 8, 16)
STYLES = ("relu", "tanh")
TEMPOS = (0.5, 1.0, 2.0)
ALPHA_TARGETS = (0.25, 0.5, 1.0)
ALPHA_SPEEDS = (0.05, 0.15, 0.4)
ALPHA_CURVES = ("linear", "ease")
DEFAULT_SPEED = 0.1
# Run-time multiplier of a seed's stored weights (see Seed): brings their gradient RMS to the host's.
SEED_WEIGHT_GAIN = 3.2
RELU_GAIN = 2**0.5  # He's gain: relu halves the variance it passes on
LIVE = (Stage.TRAINING, Stage.BLENDING, Stage.PRUNING)

# Number of choices of each factored action head, in TELE-321 order.
HEAD_SIZES_WITHOUT_SLOT = {
    "op": len(Op),
    "blueprint": len(BLUEPRINT_WIDTHS),
    "style": len(STYLES),
    "tempo": len(TEMPOS),
    "alpha_target": len(ALPHA_TARGETS),
    "alpha_speed": len(ALPHA_SPEEDS),
    "alpha_curve": len(ALPHA_CURVES),
}
HEADS = ("op", "slot", "blueprint", "style", "tempo", "alpha_target", "alpha_speed", "alpha_curve")


def slot_names(n: int) -> tuple[str, ...]:
    """Slot ids of a host with n slots: r0c0, r0c1, ..."""
    return tuple(f"r0c{i}" for i in range(n))


def head_sizes(n_slots: int) -> dict[str, int]:
    """Choices per action head for a host with n_slots slots."""
    sizes = dict(HEAD_SIZES_WITHOUT_SLOT)
    sizes["slot"] = n_slots
    return {h: sizes[h] for h in HEADS}


@dataclass(frozen=True)
class EnvConfig:
    """Shape and economics of the seed-management task."""

    slots: int = 3
    in_dim: int = 8
    hidden: int = 16
    episode_steps: int = 50
    batch: int = 64
    train_size: int = 512
    val_size: int = 256
    host_lr: float = 0.1
    improvement_scale: float = 2.0
    param_cost: float = 0.02
    invalid_penalty: float = 0.1
    collapse_factor: float = 100.0  # a validation loss this many times the episode's first (or NaN) ends it
    collapse_penalty: float = 2.0


class Seed(nn.Module):
    """A residual seed: gain * (x + alpha * f(x)); gain is 1 except under the vanish fault.

    Built to learn at about its host's per-parameter rate (TELE-557 ratio near 1, any
    alpha): f's weights are stored at 1/gain of their working scale and multiplied back
    at run time (equalised learning rate; gain is SEED_WEIGHT_GAIN, times sqrt(width/8)
    on the inner layer, whose gradient returns through width outer columns of scale
    1/sqrt(width), and He's sqrt(2) on a relu), and f's parameters get their gradient
    as if alpha were 1 (gradient isolation from the blending schedule).
    """

    def __init__(self, width: int, blueprint: int, style: int, generator: torch.Generator) -> None:
        super().__init__()
        self.inner = nn.Linear(width, BLUEPRINT_WIDTHS[blueprint])
        self.outer = nn.Linear(BLUEPRINT_WIDTHS[blueprint], width)
        width_gain = (BLUEPRINT_WIDTHS[blueprint] / BLUEPRINT_WIDTHS[1]) ** 0.5
        self.gains = (SEED_WEIGHT_GAIN * width_gain, SEED_WEIGHT_GAIN)
        with torch.no_grad():
            for layer, gain in zip((self.inner, self.outer), self.gains, strict=True):
                bound = layer.in_features**-0.5 / gain
                layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=generator))
                layer.bias.zero_()
        self.style = style
        self.alpha = 0.0
        self.gain = 1.0

    def forward(self, x: Tensor) -> Tensor:
        relu = STYLES[self.style] == "relu"
        isolation = 1.0 / self.alpha if self.alpha > 0 else 1.0
        h = self._linear(self.inner, self.gains[0] * (RELU_GAIN if relu else 1.0), isolation, x)
        h = torch.relu(h) if relu else torch.tanh(h)
        branch = self._linear(self.outer, self.gains[1], isolation, h)
        return self.gain * (x + self.alpha * branch)

    @staticmethod
    def _linear(layer: nn.Linear, gain: float, isolation: float, x: Tensor) -> Tensor:
        """layer(x) with its stored weight times gain, and its parameters' gradients times isolation."""
        return F.linear(x, _grad_scaled(layer.weight * gain, isolation), _grad_scaled(layer.bias, isolation))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _GradScale(torch.autograd.Function):
    """Identity forward; the gradient flowing back is multiplied by a constant."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, t: Tensor, scale: float) -> Tensor:
        ctx.scale = scale  # type: ignore[attr-defined]
        return t.view_as(t)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None  # type: ignore[attr-defined]


def _grad_scaled(t: Tensor, scale: float) -> Tensor:
    """t, whose gradient is multiplied by scale on the way back (nothing to do for 1.0)."""
    if scale == 1.0:
        return t
    out: Tensor = _GradScale.apply(t, scale)  # type: ignore[no-untyped-call]
    return out


@dataclass
class Slot:
    """One slot of a host: its stage, its seed and the seed's blending schedule."""

    name: str
    stage: Stage = Stage.EMPTY
    seed: Seed | None = None
    watch: SeedWatch | None = None
    alpha_target: float = 0.0
    alpha_speed: float = DEFAULT_SPEED
    curve: int = 0
    tempo: float = 1.0
    age: int = 0


class Host(nn.Module):
    """A small MLP whose hidden activations pass through the slots' seeds."""

    def __init__(self, cfg: EnvConfig, generator: torch.Generator) -> None:
        super().__init__()
        dims = [cfg.in_dim] + [cfg.hidden] * cfg.slots
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.out = nn.Linear(cfg.hidden, 1)
        with torch.no_grad():
            for layer in [*self.layers, self.out]:
                bound = layer.in_features**-0.5
                layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=generator))
                layer.bias.zero_()

    def run(self, x: Tensor, seeds: Sequence[Seed | None]) -> Tensor:
        """Forward through every layer, then the seed of the slot after it (if any)."""
        for layer, seed in zip(self.layers, seeds, strict=True):
            x = torch.tanh(layer(x))
            if seed is not None:
                x = seed(x)
        out: Tensor = self.out(x)
        return out


@dataclass(frozen=True)
class Action:
    """One environment's factored action, each head's choice as an index."""

    op: int
    slot: int = 0
    blueprint: int = 0
    style: int = 0
    tempo: int = 0
    alpha_target: int = 0
    alpha_speed: int = 0
    alpha_curve: int = 0


class SeedEnv:
    """One host network and its slots; `step` applies an action and trains the host once."""

    def __init__(self, env_id: str, cfg: EnvConfig, seed: int, tele: Telemetry | None = None) -> None:
        self.env_id = env_id
        self.cfg = cfg
        self.tele = tele
        self.gen = torch.Generator().manual_seed(seed)
        teacher_w1 = torch.randn(cfg.in_dim, 32, generator=self.gen)
        teacher_w2 = torch.randn(32, 1, generator=self.gen) / 32**0.5
        self.x_train = torch.randn(cfg.train_size, cfg.in_dim, generator=self.gen)
        self.x_val = torch.randn(cfg.val_size, cfg.in_dim, generator=self.gen)
        self.y_train = torch.sin(self.x_train @ teacher_w1 / cfg.in_dim**0.5) @ teacher_w2
        self.y_val = torch.sin(self.x_val @ teacher_w1 / cfg.in_dim**0.5) @ teacher_w2
        self.slots = [Slot(name) for name in slot_names(cfg.slots)]
        self.pinned: str | None = None
        self.host = Host(cfg, self.gen)
        self.t = 0
        self.val_ref = 1.0
        self.val = 1.0
        self.reset()

    @property
    def obs_dim(self) -> int:
        return self.cfg.slots * (len(Stage) + 4) + 3

    def reset(self) -> Tensor:
        """Start a new episode: a fresh host and empty slots."""
        for slot in self.slots:
            if slot.name != self.pinned:
                self._clear(slot)
        self.host.load_state_dict(Host(self.cfg, self.gen).state_dict())  # in place: watches keep their host
        self.t = 0
        self.val = self._val_loss()
        self.val_ref = max(self.val, 1e-6)
        return self.observe()

    def observe(self) -> Tensor:
        """Slot stages, alphas, schedule and size, plus the host's progress."""
        feats: list[float] = []
        for slot in self.slots:
            onehot = [0.0] * len(Stage)
            onehot[slot.stage] = 1.0
            alpha = slot.seed.alpha if slot.seed is not None else 0.0
            width = slot.seed.inner.out_features / max(BLUEPRINT_WIDTHS) if slot.seed is not None else 0.0
            feats += [
                *onehot,
                alpha,
                slot.alpha_target,
                width,
                min(slot.age / self.cfg.episode_steps, 1.0),
            ]
        feats += [
            self.val / self.val_ref,
            self.t / self.cfg.episode_steps,
            float(self.pinned is not None),
        ]
        return torch.tensor(feats, dtype=torch.float32)

    def step(self, action: Action) -> tuple[Tensor, float, bool]:
        """Apply the action, move alphas, train the host one step; (obs, reward, done)."""
        valid = self._apply(action)
        for slot in self.slots:
            self._advance_alpha(slot)
        self._train_host()
        prev, self.val = self.val, self._val_loss()
        cost = sum(s.seed.n_params() for s in self.slots if s.seed is not None and s.stage in LIVE)
        host_params = sum(p.numel() for p in self.host.parameters())
        reward = (
            self.cfg.improvement_scale * (prev - self.val) / self.val_ref
            - self.cfg.param_cost * cost / host_params
            - (0.0 if valid else self.cfg.invalid_penalty)
        )
        self.t += 1
        done = self.t >= self.cfg.episode_steps
        if not self.val <= self.cfg.collapse_factor * self.val_ref:  # the host diverged (NaN included)
            reward, done = -self.cfg.collapse_penalty, True
        obs = self.reset() if done else self.observe()
        return obs, float(reward), done

    def live_seeds(self) -> list[Slot]:
        """Slots whose seed is still growing, blending or being pruned."""
        return [s for s in self.slots if s.stage in LIVE]

    def germinate(
        self,
        slot_index: int,
        blueprint: int = 0,
        style: int = 0,
        tempo: int = 1,
        alpha_target: int = 0,
    ) -> bool:
        """Grow a new seed in an empty slot and start watching it; False if the slot is taken."""
        slot = self.slots[slot_index]
        if slot.stage != Stage.EMPTY:
            return False
        seed = Seed(self.cfg.hidden, blueprint, style, self.gen)
        slot.seed, slot.stage, slot.age = seed, Stage.TRAINING, 0
        slot.alpha_target = ALPHA_TARGETS[alpha_target]
        slot.alpha_speed, slot.curve, slot.tempo = DEFAULT_SPEED, 0, TEMPOS[tempo]
        if self.tele is not None:
            # The demo shows every metric, so it opts into the backward gain too (watch_seed's default is off).
            slot.watch = self.tele.watch_seed(seed, host=self.host, env=self.env_id, slot=slot.name, backward_gain=True)
        return True

    def clear_slot(self, slot_index: int) -> None:
        """Empty a slot at once, releasing its seed's watch."""
        self._clear(self.slots[slot_index])

    def close(self) -> None:
        """Release every seed's watch."""
        self.pinned = None
        for slot in self.slots:
            self._clear(slot)

    # -- internals -------------------------------------------------------------------

    def _apply(self, a: Action) -> bool:
        op = Op(a.op)
        slot = self.slots[a.slot]
        if op == Op.WAIT:
            return True
        if op == Op.GERMINATE:
            return self.germinate(a.slot, a.blueprint, a.style, a.tempo, a.alpha_target)
        if op == Op.SET_ALPHA_TARGET:
            if slot.stage not in (Stage.TRAINING, Stage.BLENDING) or slot.seed is None:
                return False
            slot.stage = Stage.BLENDING
            slot.seed.style = a.style
            slot.alpha_target = ALPHA_TARGETS[a.alpha_target]
            slot.alpha_speed, slot.curve = ALPHA_SPEEDS[a.alpha_speed], a.alpha_curve
            return True
        if op == Op.PRUNE:
            if slot.stage not in (Stage.TRAINING, Stage.BLENDING) or slot.name == self.pinned:
                return False
            slot.stage, slot.alpha_target = Stage.PRUNING, 0.0
            slot.alpha_speed, slot.curve = ALPHA_SPEEDS[a.alpha_speed], a.alpha_curve
            return True
        if op == Op.FOSSILIZE:
            if slot.stage not in (Stage.TRAINING, Stage.BLENDING) or slot.seed is None:
                return False
            if slot.name == self.pinned or slot.seed.alpha < 0.2:
                return False
            slot.stage = Stage.FOSSILIZED
            slot.seed.requires_grad_(False)
            self._release(slot)
            return True
        moving = [s for s in self.live_seeds() if s.seed is not None and s.seed.alpha != s.alpha_target]
        for s in moving:
            self._advance_alpha(s)
        return bool(moving)

    def _advance_alpha(self, slot: Slot) -> None:
        seed = slot.seed
        if seed is None or slot.stage == Stage.FOSSILIZED:
            return
        slot.age += 1
        gap = slot.alpha_target - seed.alpha
        step = slot.alpha_speed
        if ALPHA_CURVES[slot.curve] == "ease":
            step = max(2 * slot.alpha_speed * abs(gap), 0.01)
        seed.alpha = slot.alpha_target if abs(gap) <= step else seed.alpha + step * (1 if gap > 0 else -1)
        if slot.stage == Stage.PRUNING and seed.alpha <= 0.0:
            self._clear(slot)

    def _train_host(self) -> None:
        idx = torch.randint(0, self.cfg.train_size, (self.cfg.batch,), generator=self.gen)
        seeds = [s.seed for s in self.slots]
        with torch.enable_grad():
            self.host.zero_grad(set_to_none=True)
            for s in seeds:
                if s is not None:
                    s.zero_grad(set_to_none=True)
            pred = self.host.run(self.x_train[idx], seeds)
            loss = (pred - self.y_train[idx]).pow(2).mean()
            loss.backward()
        with torch.no_grad():
            for p in self.host.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-self.cfg.host_lr)
            for slot in self.slots:
                if slot.seed is not None and slot.stage in LIVE:
                    for p in slot.seed.parameters():
                        if p.grad is not None:
                            p.add_(p.grad, alpha=-self.cfg.host_lr * slot.tempo)

    def _val_loss(self) -> float:
        with torch.no_grad():
            pred = self.host.run(self.x_val, [s.seed for s in self.slots])
            return float((pred - self.y_val).pow(2).mean())

    def _release(self, slot: Slot) -> None:
        if slot.watch is not None:
            slot.watch.remove()
            slot.watch = None

    def _clear(self, slot: Slot) -> None:
        self._release(slot)
        slot.stage, slot.seed, slot.age = Stage.EMPTY, None, 0
        slot.alpha_target, slot.alpha_speed, slot.curve, slot.tempo = 0.0, DEFAULT_SPEED, 0, 1.0


class VecEnv:
    """A batch of SeedEnvs stepped together in one process; env ids are "0", "1", ..."""

    def __init__(self, n: int, cfg: EnvConfig, seed: int, tele: Telemetry | None = None) -> None:
        self.cfg = cfg
        self.envs = [SeedEnv(str(i), cfg, seed * 1000 + i, tele) for i in range(n)]

    @property
    def obs_dim(self) -> int:
        return self.envs[0].obs_dim

    def observe(self) -> Tensor:
        return torch.stack([e.observe() for e in self.envs])

    def step(self, actions: Sequence[Action]) -> tuple[Tensor, Tensor, Tensor]:
        """Step every env; (obs [E, D], rewards [E], dones [E]) on the CPU."""
        results = [env.step(a) for env, a in zip(self.envs, actions, strict=True)]
        obs = torch.stack([r[0] for r in results])
        rewards = torch.tensor([r[1] for r in results], dtype=torch.float32)
        dones = torch.tensor([float(r[2]) for r in results], dtype=torch.float32)
        return obs, rewards, dones

    def close(self) -> None:
        for env in self.envs:
            env.close()
