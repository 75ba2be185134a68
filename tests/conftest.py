"""Shared fixtures: a small real multi-head policy and a helper to run optimizer steps."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from tele_exporter import Telemetry

DESIGN_METRICS = (
    "tele_head_grad_norm",
    "tele_head_grad_norm_prev",
    "tele_policy_grad_norm",
    "tele_gradient_cv",
    "tele_kl_divergence",
    "tele_seed_grad_ratio",
    "tele_seed_gradient_vanishing",
    "tele_seed_gradient_exploding",
    "tele_seed_backward_gain",
    "tele_ppo_updates_total",
    "tele_ppo_early_stops_total",
    "tele_last_update_timestamp_seconds",
    "tele_nonfinite_gradients_total",
)
"""Every metric of the metric contract (README's metric table): names users and rules rely on."""


class TinyPolicy(nn.Module):
    """A trunk, two action heads and a value head: enough structure for per-head telemetry."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 16)
        self.op = nn.Linear(16, 4)
        self.slot = nn.Linear(16, 3)
        self.value = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        return self.op(h), self.slot(h), self.value(h)


def backward(policy: TinyPolicy, scale: float = 1.0, seed: int = 0, heads: tuple[str, ...] = ("op", "slot")) -> None:
    """Fill .grad with a real backward pass; only the named heads get a gradient."""
    gen = torch.Generator().manual_seed(seed)
    policy.zero_grad(set_to_none=True)
    op, slot, value = policy(torch.randn(8, 6, generator=gen))
    parts = {"op": op.pow(2).mean(), "slot": slot.pow(2).mean()}
    loss = value.pow(2).mean() + sum((parts[h] for h in heads), torch.zeros(()))
    (loss * scale).backward()


@pytest.fixture
def policy() -> TinyPolicy:
    torch.manual_seed(0)
    return TinyPolicy()


@pytest.fixture
def tele(policy: TinyPolicy) -> Iterator[Telemetry]:
    t = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot})
    yield t
    t.close()
