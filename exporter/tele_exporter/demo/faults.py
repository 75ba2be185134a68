"""Deliberate training faults, so that every TELE alert can be seen firing and resolving.

Each mode pushes one signal past its critical (or vanishing) level while it is on:
kl perturbs the behaviour policy's logits (a stale, off-policy rollout, so the
real PPO log-ratio is large); explode scales the loss; vanish turns a pinned
seed's output gain down; nan poisons one head's gradients; entropy sharpens every
head's logits until the policy is deterministic (entropy collapse); value stores
noise-corrupted values in the rollout, so the value function explains less than a
constant (explained variance < 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .env import Stage, VecEnv

FAULTS = ("none", "kl", "explode", "vanish", "nan", "entropy", "value")
KL_LOGIT_NOISE = 1.0
EXPLODE_LOSS_SCALE = 1e4
VANISH_GAIN = 0.01
NAN_HEAD = "op"
PINNED_ENV = 0
ENTROPY_LOGIT_SCALE = 1e3
VALUE_NOISE = 1.0


@dataclass(frozen=True)
class FaultPlan:
    """A fault mode and its window: on for updates k (1-based) with after < k <= until."""

    mode: str = "none"
    after: int = 0
    until: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in FAULTS:
            raise ValueError(f"unknown fault {self.mode!r}; choose one of {', '.join(FAULTS)}")
        if self.after < 0 or (self.until is not None and self.until < 0):
            raise ValueError("fault window bounds must be >= 0")

    def active(self, update: int) -> bool:
        """Whether the fault is on during the 1-based update `update`."""
        if self.mode == "none" or update <= self.after:
            return False
        return self.until is None or update <= self.until

    def behaviour_logits(
        self, logits: Mapping[str, Tensor], on: bool, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        """kl: the logits the rollout acts with, perturbed so the learner's ratio drifts far."""
        if not (on and self.mode == "kl"):
            return dict(logits)
        return {
            h: lg + KL_LOGIT_NOISE * torch.randn(lg.shape, generator=generator, device=lg.device)
            for h, lg in logits.items()
        }

    def loss_scale(self, on: bool) -> float:
        """explode: the factor the PPO loss is multiplied by before backward."""
        return EXPLODE_LOSS_SCALE if on and self.mode == "explode" else 1.0

    def poison(self, logits: Mapping[str, Tensor], on: bool) -> None:
        """nan: make the gradient reaching one head's logits NaN."""
        if on and self.mode == "nan":
            logits[NAN_HEAD].register_hook(_nan_grad)  # type: ignore[no-untyped-call]

    def sharpen(self, logits: dict[str, Tensor], on: bool) -> None:
        """entropy: scale every head's logits (in the rollout and the update) so each picks one action."""
        if on and self.mode == "entropy":
            for h, lg in logits.items():
                logits[h] = lg * ENTROPY_LOGIT_SCALE

    def corrupt_values(self, value: Tensor, on: bool, generator: torch.Generator | None) -> Tensor:
        """value: the state values the rollout stores, drowned in noise (corrupted data for GAE and EV)."""
        if not (on and self.mode == "value"):
            return value
        return value + VALUE_NOISE * torch.randn(value.shape, generator=generator, device=value.device)

    def prepare_envs(self, vec: VecEnv, on: bool) -> None:
        """vanish: keep a live seed pinned in env 0 with a tiny output gain; restore otherwise."""
        if self.mode != "vanish":
            return
        env = vec.envs[PINNED_ENV]
        if not on:
            env.pinned = None
            for slot in env.slots:
                if slot.seed is not None:
                    slot.seed.gain = 1.0
            return
        pinned = next((s for s in env.slots if s.name == env.pinned and s.stage != Stage.EMPTY), None)
        if pinned is None:
            candidates = env.live_seeds() or [s for s in env.slots if s.stage == Stage.EMPTY]
            if not candidates:
                env.clear_slot(0)
                candidates = [env.slots[0]]
            pinned = candidates[0]
            if pinned.stage == Stage.EMPTY:
                env.germinate(env.slots.index(pinned))
            if pinned.stage == Stage.PRUNING:
                pinned.stage = Stage.BLENDING
            env.pinned = pinned.name
        assert pinned.seed is not None
        pinned.seed.gain = VANISH_GAIN


def _nan_grad(grad: Tensor) -> Tensor:
    return torch.full_like(grad, math.nan)
