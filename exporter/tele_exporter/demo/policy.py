"""The factored-action policy: a shared trunk, eight action heads (TELE-321) and a value head.

Causal masks (docs/demo.md) say which heads an op actually uses; a head that does
not matter for a step contributes nothing to its log-probability, its loss,
its advantage or its KL.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .env import HEADS, Op, head_sizes

# For each head, the ops under which it is causally relevant; "op" always is.
HEAD_OPS: dict[str, tuple[Op, ...]] = {
    "op": tuple(Op),
    "slot": tuple(op for op in Op if op != Op.WAIT),
    "blueprint": (Op.GERMINATE,),
    "tempo": (Op.GERMINATE,),
    "style": (Op.GERMINATE, Op.SET_ALPHA_TARGET),
    "alpha_target": (Op.GERMINATE, Op.SET_ALPHA_TARGET),
    "alpha_speed": (Op.SET_ALPHA_TARGET, Op.PRUNE),
    "alpha_curve": (Op.SET_ALPHA_TARGET, Op.PRUNE),
}


def causal_masks(op: Tensor) -> dict[str, Tensor]:
    """Float 0/1 mask per head, shaped like `op`: 1 where the head matters for that op."""
    masks: dict[str, Tensor] = {}
    for head in HEADS:
        allowed = torch.tensor([int(o) for o in HEAD_OPS[head]], device=op.device)
        masks[head] = torch.isin(op, allowed).to(torch.float32)
    return masks


class Policy(nn.Module):
    """Trunk -> eight categorical action heads and a value head."""

    def __init__(self, obs_dim: int, n_slots: int, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in head_sizes(n_slots).items()})
        self.value = nn.Linear(hidden, 1)
        with torch.no_grad():
            for head in self.heads.values():
                assert isinstance(head, nn.Linear)
                head.weight.mul_(0.1)
                head.bias.zero_()

    def forward(self, obs: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Logits per head [B, n_h] and the state value [B]."""
        h = self.trunk(obs)
        logits = {name: head(h) for name, head in self.heads.items()}
        return logits, self.value(h).squeeze(-1)

    def head_modules(self) -> dict[str, nn.Module]:
        """Head name -> module, as Telemetry wants them."""
        return dict(self.heads.items())


def sample(logits: Mapping[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """One choice per head per row, drawn from the logits."""
    out: dict[str, Tensor] = {}
    for name, lg in logits.items():
        probs = torch.softmax(lg.float(), dim=-1)
        out[name] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return out


def log_probs(logits: Mapping[str, Tensor], actions: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-head log-probability of the chosen actions."""
    out: dict[str, Tensor] = {}
    for name, lg in logits.items():
        logp = torch.log_softmax(lg, dim=-1)
        out[name] = logp.gather(-1, actions[name].unsqueeze(-1)).squeeze(-1)
    return out


def entropies(logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-head entropy of each row's distribution."""
    out: dict[str, Tensor] = {}
    for name, lg in logits.items():
        logp = torch.log_softmax(lg, dim=-1)
        out[name] = -(logp.exp() * logp).sum(-1)
    return out


def joint(per_head: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> Tensor:
    """Sum over heads of a per-head quantity, counting only causally relevant heads."""
    return torch.stack([per_head[h] * masks[h] for h in per_head]).sum(0)
