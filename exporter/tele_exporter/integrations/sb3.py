"""Stable-Baselines3: publish PPO's and A2C's own KL, clip fraction, entropy, EV and std, and the gradient norms.

`TelemetryCallback` opens one `Telemetry.update()` per `train()` call of a PPO or
A2C model: SB3 calls `on_rollout_end` right before `train()` and
`on_rollout_start` (or `on_training_end`) right after it, which is where the
update is published. PPO's `train()` makes n_epochs x minibatches optimizer
steps, A2C's exactly one; any other algorithm is refused when `learn()` starts,
naming it, because its `train()` is not one PPO-style update.

The server (with `port` set) is bound when the callback is constructed, so
`callback.url` can be printed before `learn()`, and a taken fixed port raises
`PortInUseError` there, as `serve` does. `learn()` returns as soon as training
ends; the server keeps serving until `callback.close()`, which waits (up to
`linger` seconds, 30 by default) until Prometheus has scraped the final update.

Gradients: SB3 clips with `clip_grad_norm_` and then calls `optimizer.step()`,
so an optimizer hook only ever sees post-clip gradients and the pre-clip norm is
not observable there. The callback therefore takes clipping over for the span
of `train()`: it lifts the model's `max_grad_norm` to float32's largest value
(SB3's own call still runs and multiplies by exactly 1) and clips with
`Update.clip_grad_norm_(max_grad_norm)` in an optimizer step pre-hook. The
update applied is the same as SB3's; `tele_policy_grad_norm{clip="pre"}` is the
true pre-clip norm and `{clip="post"}` what the optimizer saw. `max_grad_norm`
is restored after every `train()`, so checkpoints never save the lifted value.

KL, clip fraction, entropy and explained variance are SB3's own: `train/approx_kl`
(PPO: mean over the minibatches of the last epoch run), `train/clip_fraction` (PPO:
mean over every minibatch), `train/entropy_loss` (minus the mean entropy: over every
minibatch for PPO, of the one batch for A2C) and `train/explained_variance` (of the
rollout's values, before the update), read from the model's logger after `train()`
and published as `tele_kl_divergence`, `tele_ppo_clip_fraction`,
`tele_policy_entropy` (= -entropy_loss) and `tele_explained_variance`, each equal to
the logged value. SB3 logs NaN for an explained variance with Var(returns) = 0;
TELE-200 calls that missing, so the callback leaves it out then. A2C logs no KL
and no clip fraction, so an A2C run has neither series.

Heads: the action head is the policy's `action_net`; for a MultiDiscrete action
space, whose sub-actions' logits are consecutive output rows of that one
`nn.Linear`, there is one head per sub-action, `action_net.0`, `action_net.1`, ...,
each a row slice sized by `action_space.nvec`. `value_net` is measured as another
group (kind="other"): shown and alerted on, left out of the gradient CV. A Gaussian
policy (Box actions) keeps its log standard deviations in `log_std`, a parameter in
no submodule, which SB3 logs as `train/std` (the mean of exp(log_std), after the
update); it is measured as a group of its own, `log_std`, so its gradient norm is
shown too, and SB3's logged `train/std` is published as `tele_policy_std`, equal
to it. A categorical policy logs no std and has no such series.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from gymnasium import spaces
from prometheus_client import CollectorRegistry
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..catalog import Catalog, default_catalog
from ..distributed import rank_port
from ..measure.heads import HeadSpec
from ..server.http import DEFAULT_ADDR, Server, serve
from ..snapshot import Snapshot, empty_snapshot
from ..telemetry import settings
from ..telemetry.telemetry import Telemetry, Update

SUPPORTED_ALGORITHMS = (PPO, A2C)
DEFAULT_LINGER = 30.0  # seconds close() waits for Prometheus to scrape the final update

_LIFTED_MAX_NORM = float(torch.finfo(torch.float32).max)


def policy_heads(policy: nn.Module) -> dict[str, HeadSpec]:
    """An SB3 actor-critic policy's action heads: `action_net`, or a row slice of it per MultiDiscrete sub-action."""
    action_net = getattr(policy, "action_net", None)
    if not isinstance(action_net, nn.Module) or not any(True for _ in action_net.parameters()):
        raise TypeError(f"{type(policy).__name__} has no action_net with parameters")
    space = getattr(policy, "action_space", None)
    if not isinstance(space, spaces.MultiDiscrete):
        return {"action_net": action_net}
    sizes = [int(n) for n in space.nvec.flatten()]
    heads: dict[str, HeadSpec] = {}
    start = 0
    for i, n in enumerate(sizes):
        heads[f"action_net.{i}"] = (action_net, slice(start, start + n))
        start += n
    return heads


def policy_action_sizes(policy: nn.Module) -> dict[str, int]:
    """Each discrete action head's number of actions (its entropy's maximum); none for a Gaussian policy."""
    space = getattr(policy, "action_space", None)
    if isinstance(space, spaces.Discrete):
        return {"action_net": int(space.n)}
    if isinstance(space, spaces.MultiDiscrete):
        return {f"action_net.{i}": int(n) for i, n in enumerate(space.nvec.flatten())}
    return {}


def policy_groups(policy: nn.Module) -> dict[str, HeadSpec]:
    """The other measured groups of an SB3 actor-critic policy, outside the gradient CV.

    `value_net`, and for a Gaussian policy its `log_std`: a bare parameter in no
    submodule, so it is held by a ParameterList of its own (the same Parameter, not a copy).
    """
    groups: dict[str, HeadSpec] = {}
    value_net = getattr(policy, "value_net", None)
    if isinstance(value_net, nn.Module) and any(True for _ in value_net.parameters()):
        groups["value_net"] = value_net
    log_std = getattr(policy, "log_std", None)
    if isinstance(log_std, nn.Parameter) and log_std.requires_grad:
        groups["log_std"] = nn.ParameterList([log_std])
    return groups


class _CallbackSource:
    """What the callback's server reads: the Telemetry once `learn()` has built it, an empty run before.

    It lets the port be bound at construction, before the model's policy (and so the
    Telemetry's heads) is known; the Telemetry is then built on this registry.
    """

    def __init__(self, registry: CollectorRegistry | None, const_labels: Mapping[str, str] | None) -> None:
        self.tele: Telemetry | None = None
        self._registry = registry if registry is not None else CollectorRegistry()
        self._owns_registry = registry is None
        self._catalog = default_catalog()
        self._const_labels = settings.const_labels(const_labels, self._catalog)
        self._enabled = settings.enabled(None)
        self._empty = empty_snapshot(())

    @property
    def catalog(self) -> Catalog:
        return self.tele.catalog if self.tele is not None else self._catalog

    @property
    def const_labels(self) -> Mapping[str, str]:
        return self.tele.const_labels if self.tele is not None else self._const_labels

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    @property
    def owns_registry(self) -> bool:
        return self._owns_registry

    @property
    def enabled(self) -> bool:
        return self.tele.enabled if self.tele is not None else self._enabled

    def snapshot(self) -> Snapshot:
        return self.tele.snapshot() if self.tele is not None else self._empty

    def errors(self) -> dict[str, int]:
        return self.tele.errors() if self.tele is not None else {}


class TelemetryCallback(BaseCallback):  # type: ignore[misc,unused-ignore]
    """An SB3 callback that publishes one Telemetry update per PPO or A2C `train()` call.

    Pass a Telemetry built over `model.policy`, or None to have one built with
    `policy_heads(model.policy)` and `policy_groups(model.policy)` when training
    starts. With `port` set, the callback serves /metrics on `port + LOCAL_RANK`
    (see `tele_exporter.distributed`; port 0: any free port) from the moment it is
    constructed, so `callback.url` is known before `learn()`; a taken port raises
    `PortInUseError` naming it. `close()` then waits up to `linger` seconds for
    Prometheus to scrape the final update.
    """

    def __init__(
        self,
        tele: Telemetry | None = None,
        *,
        port: int | None = None,
        addr: str = DEFAULT_ADDR,
        registry: CollectorRegistry | None = None,
        const_labels: Mapping[str, str] | None = None,
        linger: float = DEFAULT_LINGER,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.tele = tele
        self._registry, self._const_labels = registry, const_labels
        self._source: _CallbackSource | None = None
        self._hook: RemovableHandle | None = None
        self._upd: Update | None = None
        self._max_norm: float | None = None
        self._steps = 0
        self._epochs_before = 0
        self.server: Server | None = None
        if port is not None:
            if tele is not None:
                self.server = serve(tele, rank_port(port), addr, linger=linger)
            else:
                self._source = _CallbackSource(registry, const_labels)
                self.server = serve(self._source, rank_port(port), addr, linger=linger)

    @property
    def url(self) -> str | None:
        """The /metrics URL, known from construction; None without `port` (port 0 in it: telemetry disabled)."""
        return self.server.url if self.server is not None else None

    # -- SB3 callback events -----------------------------------------------------------

    def _init_callback(self) -> None:
        if not isinstance(self.model, SUPPORTED_ALGORITHMS):
            names = " and ".join(a.__name__ for a in SUPPORTED_ALGORITHMS)
            raise TypeError(
                f"TelemetryCallback supports {names} (one Telemetry update per train() call); "
                f"got {type(self.model).__name__}"
            )
        if self.tele is None:
            policy = self.model.policy
            source = self._source
            self.tele = Telemetry(
                policy,
                heads=policy_heads(policy),
                groups=policy_groups(policy),
                action_sizes=policy_action_sizes(policy),
                registry=source.registry if source is not None else self._registry,
                const_labels=self._const_labels,
            )
            if source is not None:
                source.tele = self.tele
        if {id(p) for p in self.tele.params} != {id(p) for p in self.model.policy.parameters()}:
            raise ValueError("the Telemetry must be built over model.policy: it clips the policy's gradients")

    def _on_training_start(self) -> None:
        self._finish()
        if self._hook is None:
            self._hook = self.model.policy.optimizer.register_step_pre_hook(self._before_step)

    def _on_rollout_end(self) -> None:
        self._finish()
        assert self.tele is not None
        self._upd = self.tele.update().__enter__()
        self._steps = 0
        model: Any = self.model
        self._epochs_before = int(model._n_updates)
        max_norm = getattr(model, "max_grad_norm", None)
        if isinstance(max_norm, numbers.Real) and not isinstance(max_norm, bool) and math.isfinite(max_norm):
            self._max_norm = float(max_norm)
            model.max_grad_norm = _LIFTED_MAX_NORM

    def _on_rollout_start(self) -> None:
        self._finish()

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        """SB3 calls this only when learn() returns normally: a later absence is a clean end, not a crash."""
        self._release()
        if self.tele is not None:
            self.tele.finish()

    def _release(self) -> None:
        """Publish an update still open and remove the optimizer hook."""
        self._finish()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- public --------------------------------------------------------------------

    def close(self, linger: float | None = None) -> bool:
        """Publish an update still open, stop the server and unregister the telemetry.

        With a server, first wait until Prometheus has scraped the final update, up
        to `linger` seconds (default: the callback's); returns False, with one
        warning (Server.close's), when that wait timed out, True otherwise.
        """
        self._release()
        scraped = True
        if self.server is not None:
            scraped = self.server.close(linger)  # a timed-out wait logs its one warning there
            self.server = None
        if self.tele is not None:
            self.tele.close()
        return scraped

    # -- internals -----------------------------------------------------------------

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook: SB3 has just run its (lifted) clip; clip and measure here."""
        upd = self._upd
        if upd is None:
            return
        self._steps += 1
        if self._max_norm is not None:
            upd.clip_grad_norm_(self._max_norm)
        else:
            upd.observe_gradients()

    def _finish(self) -> None:
        """Close the open update, if any: restore max_grad_norm and publish SB3's own values."""
        upd, self._upd = self._upd, None
        if upd is None:
            return
        model: Any = self.model
        if self._max_norm is not None:
            model.max_grad_norm = self._max_norm
            self._max_norm = None
        assert self.tele is not None
        logged = model.logger.name_to_value
        epochs = int(model._n_updates)
        completed = epochs > self._epochs_before and logged.get("train/n_updates") == epochs
        try:
            if not completed:
                return  # train() did not finish (it raised): SB3 logged nothing for this update
            if "train/approx_kl" in logged:
                upd.observe_kl_value(float(logged["train/approx_kl"]))
            if self._steps < self._planned_steps():
                upd.early_stop()
            if "train/clip_fraction" in logged:
                upd.observe_clip_fraction(float(logged["train/clip_fraction"]))
            if "train/entropy_loss" in logged:
                upd.observe_entropy_value(-float(logged["train/entropy_loss"]))
            if "train/std" in logged:  # a Gaussian policy's mean exp(log_std)
                upd.observe_action_std_value(float(logged["train/std"]))
            ev = logged.get("train/explained_variance")
            if ev is not None and not (math.isnan(float(ev)) and float(model.rollout_buffer.returns.var()) == 0.0):
                upd.observe_explained_variance_value(float(ev))
        finally:
            upd.__exit__(None, None, None)

    def _planned_steps(self) -> int:
        """Optimizer steps `train()` makes without a KL early stop: PPO's epochs x minibatches, A2C's one."""
        model: Any = self.model
        if isinstance(model, A2C):
            return 1
        samples = int(model.n_steps) * int(model.n_envs)
        return int(model.n_epochs) * math.ceil(samples / int(model.batch_size))
