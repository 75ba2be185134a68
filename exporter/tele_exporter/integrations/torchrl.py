"""TorchRL: publish what a `ClipPPOLoss` computes (clip fraction, entropy, explained variance, max ratio) and k3 KL.

Every value comes from the loss's own outputs, with no extra forward pass:
`clip_fraction`, `entropy` (present when the loss has an entropy bonus, the
default) and `explained_variance` (present with `log_explained_variance=True`,
the default) are recorded as they are, once per minibatch, so the update
publishes their means over its minibatches, as TorchRL's PPO examples average
their logged loss outputs. TorchRL's explained variance is of each minibatch's
current critic against its value targets, not of the rollout before the
update (TELE-200's), so it rises through an update's epochs.

`max_ratio`, the minibatch's largest ratio pi_new / pi_old, is TELE-151's ratio
max of the one action head (`actor` with `loss_heads`; a Telemetry with several
action heads gets none, since the joint ratio is no one head's): the update
publishes the largest of its minibatches' values as
`tele_head_ratio_max{head="actor"}` (a maximum, where the others are means), each
exactly TorchRL's own float32 value. TorchRL does not clamp the ratio; it is
clamped to [exp(-20), exp(20)] as `observe_ratios` clamps.

`ClipPPOLoss.forward` returns scalars only: it works on a shallow clone of the
input tensordict and writes nothing back, so the per-sample log-ratio
r = log pi_new - log pi_old is not observable without a second forward pass.
Two of its outputs are exactly the two means k3 needs, though:
`mean_ratio` = mean(exp(r)) and `kl_approx` = mean(-r) (TorchRL's signed k1
estimator of KL(old || new), which goes negative). So
mean(exp(r) - 1 - r) = mean_ratio - 1 + kl_approx, the non-negative estimator
`Update.observe_kl_value` expects, comes at no extra cost, on the device, with no host sync.

The identity needs both means over the same ratio. With `delay_actor=True` or
`max_importance_ratio` set, `mean_ratio` is the behaviour-policy ratio while
`kl_approx` is taken against the proximal policy, so such losses are refused.
For composite (multi-head) actions r is the sum of the heads' log-ratios,
the joint policy's log-ratio, not TELE-111's causally weighted per-head mean.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchrl.objectives import ClipPPOLoss

from ..telemetry.telemetry import Update

_NEEDED = ("mean_ratio", "kl_approx", "clip_fraction")
_OPTIONAL = ("entropy", "explained_variance", "max_ratio")


def loss_heads(loss: ClipPPOLoss) -> dict[str, nn.Module]:
    """The action head of a ClipPPOLoss: its `actor_network`, the one head the gradient CV sees.

    Build the Telemetry over the loss module itself, whose parameters are what
    TorchRL's examples optimise and clip:
    `Telemetry(loss, heads=loss_heads(loss), groups=loss_groups(loss))`.
    """
    _check_loss(loss)
    return {"actor": loss.actor_network}


def loss_groups(loss: ClipPPOLoss) -> dict[str, nn.Module]:
    """The critic of a ClipPPOLoss, when it has one with parameters: measured and shown, left out of the CV."""
    _check_loss(loss)
    critic = getattr(loss, "critic_network", None)
    if isinstance(critic, nn.Module) and any(True for _ in critic.parameters()):
        return {"critic": critic}
    return {}


def k3_kl(out: Any) -> Tensor:
    """TELE-111's k3 mean(exp(r) - 1 - r) from a ClipPPOLoss output, as a float64 tensor on its device.

    It is mean_ratio - 1 + kl_approx, in float64 from TorchRL's float32 means, so
    it carries the float32 rounding of mean_ratio (about 1e-7), as CleanRL's own
    float32 `approx_kl` does; Telemetry takes values down to -1e-6 as 0.
    """
    values = _outputs(out)
    return values["mean_ratio"] - 1.0 + values["kl_approx"]


def observe_loss(upd: Update, loss: ClipPPOLoss, out: Any) -> Tensor:
    """Record one ClipPPOLoss minibatch in `upd`: k3 KL, clip fraction, entropy, EV and max ratio; returns the KL.

    Call it once per minibatch: the update publishes the mean of each over its
    minibatches, which is what TorchRL's PPO examples log for their loss outputs,
    and the largest `max_ratio` of them. `entropy`, `explained_variance` and
    `max_ratio` are recorded when the loss returned them. All of it stays on the
    loss's device: no host sync.
    """
    _check_loss(loss)
    values = _outputs(out)
    upd.observe_clip_fraction(values["clip_fraction"])
    if "entropy" in values:
        upd.observe_entropy_value(values["entropy"])
    if "explained_variance" in values:
        upd.observe_explained_variance_value(values["explained_variance"])
    heads = upd.policy.heads
    if "max_ratio" in values and len(heads) == 1:  # the joint ratio is a head's only when there is one head
        upd.observe_ratio_max_value({heads[0]: values["max_ratio"]})
    return upd.observe_kl_value(values["mean_ratio"] - 1.0 + values["kl_approx"])


def _outputs(out: Any) -> dict[str, Tensor]:
    """The scalar outputs recorded (those k3 and the clip fraction need, and any optional ones), in float64."""
    present = set(out.keys())  # a TensorDict refuses `key in td`
    missing = [key for key in _NEEDED if key not in present]
    if missing:
        raise KeyError(
            f"the ClipPPOLoss output has no {missing}: pass the tensordict the loss returned, with its default out_keys"
        )
    keys = [*_NEEDED, *(key for key in _OPTIONAL if key in present)]
    return {key: torch.as_tensor(out[key]).detach().to(torch.float64).reshape(()) for key in keys}


def _check_loss(loss: ClipPPOLoss) -> None:
    if not isinstance(loss, ClipPPOLoss):
        raise TypeError(f"tele_exporter.integrations.torchrl needs a ClipPPOLoss, got {type(loss).__name__}")
    if getattr(loss, "delay_actor", False):
        raise ValueError(
            "ClipPPOLoss(delay_actor=True): its mean_ratio and kl_approx are taken against different "
            "policies, so the k3 KL cannot be derived from them"
        )
    if getattr(loss, "max_importance_ratio", None) is not None:
        raise ValueError(
            "ClipPPOLoss(max_importance_ratio=...): its mean_ratio is the capped behaviour ratio, "
            "so the k3 KL cannot be derived from it and kl_approx"
        )
