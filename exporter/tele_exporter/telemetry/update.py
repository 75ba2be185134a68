"""One PPO update as the trainer sees it: measure each optimizer step, observe KL and policy health, publish on exit.

An Update knows only its collaborators (the gradient meter, the policy's parameters,
the action heads' names, enter/exit callbacks, the error counter), not the Telemetry.
A disabled Telemetry's Update is the same class with `recording=False`: every argument
is checked by the same code, values are computed for the caller, and nothing is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

import torch
from torch import Tensor, nn

from ..measure.meter import GradientMeter, NonFiniteNormError
from ..measure.norms import ForeachUnsupportedError
from ..measure.policy_math import DEFAULT_CLIP_EPS, approx_kl
from ..measure.sharding import LegacyFSDPError
from .policy_record import PolicyRecorder

# Errors of the caller's own making: raised as torch's clip raises them, never counted as telemetry failures.
_CALLER_ERRORS = (NonFiniteNormError, LegacyFSDPError, ForeachUnsupportedError)


class Update:
    """One PPO update. Measure each optimizer step, observe KL, publish on exit."""

    def __init__(
        self,
        *,
        meter: GradientMeter,
        params: Sequence[nn.Parameter],
        heads: Sequence[str],
        on_enter: Callable[[Update], None],
        on_exit: Callable[[Update], None],
        record_error: Callable[[str, BaseException], None],
        recording: bool = True,
    ) -> None:
        self._meter = meter
        self._params = list(params)
        self._heads = tuple(heads)
        self._on_enter = on_enter
        self._on_exit = on_exit
        self._record_error = record_error
        self.recording = recording
        self.kls: list[Tensor] = []
        self.clip_fractions: list[Tensor] = []
        self.policy = PolicyRecorder(self._heads, recording=recording)
        self.stopped_early = False
        self.measure_calls = 0
        self._open = False

    def __enter__(self) -> Update:
        self._on_enter(self)
        self._open = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        self._on_exit(self)

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> Tensor:
        """Drop-in for torch.nn.utils.clip_grad_norm_ over the policy's parameters.

        Clips in place under no_grad and returns the pre-clip total norm as a new
        float64 tensor outside the autograd graph; per-head norms come from the same
        fused pass. `foreach` is honoured as torch honours it (None: foreach where
        supported, one kernel per tensor elsewhere). With error_if_nonfinite a NaN or
        Inf total raises before any gradient is touched, as torch does. If the
        measurement itself fails, the step is missing and torch clips instead; under
        legacy FSDP it raises, since torch would clip by one shard's norm. Only L2
        norms are measured: another norm_type raises ValueError, enabled or not.
        """
        self._check_open()
        max_norm = _check_clip_args(max_norm, norm_type)
        if not self.recording:
            return torch.nn.utils.clip_grad_norm_(
                self._params, max_norm, error_if_nonfinite=error_if_nonfinite, foreach=foreach
            )
        self.measure_calls += 1
        try:
            return self._meter.measure(max_norm, error_if_nonfinite=error_if_nonfinite, foreach=foreach)
        except _CALLER_ERRORS:
            raise
        except Exception as exc:
            self._record_error("clip_grad_norm", exc)
            return torch.nn.utils.clip_grad_norm_(
                self._params, max_norm, error_if_nonfinite=error_if_nonfinite, foreach=foreach
            )

    def observe_gradients(self, max_norm: float | None = None) -> Tensor:
        """Measure this step's gradients without touching them; returns the total norm (NaN if it cannot be measured).

        For a library that clips by global norm itself after this call (RLlib's grad_clip), pass its
        max_norm: the post-clip norm published is then what that clip leaves, pre * min(1, max_norm / (pre + 1e-6)).
        """
        self._check_open()
        if max_norm is not None:
            max_norm = float(max_norm)
        if not self.recording:
            grads = [p.grad for p in self._params if p.grad is not None]
            if not grads:
                return torch.zeros((), dtype=torch.float64)  # what the meter returns for a step without gradients
            with torch.no_grad():
                return torch.nn.utils.get_total_norm(grads).to(torch.float64)
        self.measure_calls += 1
        try:
            return self._meter.measure(max_norm, scale=False)
        except Exception as exc:
            self._record_error("observe_gradients", exc)
            return torch.tensor(math.nan, dtype=torch.float64)

    def observe_kl(self, log_ratio: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """Record a causally weighted approx KL (TELE-111) from per-head log-ratios and return it as a tensor.

        r = new_logp - old_logp per head; each head's KL is the mean of exp(r) - 1 - r
        over its valid steps. The update publishes the mean of all its observe_* calls.
        """
        self._check_open()
        _check_head_mappings("observe_kl", "log-ratio", log_ratio, masks, self._heads)
        unknown = [h for h in (*log_ratio, *(masks or {})) if h not in self._heads]
        if unknown:
            raise ValueError(f"unknown head {unknown[0]!r} in observe_kl; action heads are {list(self._heads)}")
        kl = approx_kl(log_ratio, masks)
        self._keep(self.kls, kl.detach())
        return kl

    def observe_kl_value(self, value: float | Tensor) -> Tensor:
        """Record an approx KL the trainer computed itself (e.g. a PPO library's own); no host sync.

        Expected: the non-negative estimator mean(exp(r) - 1 - r), r = new_logp - old_logp,
        as CleanRL's and SB3's approx_kl. The update publishes the mean of all its
        observe_kl / observe_kl_value calls, so one call per update with the logged
        value reproduces CleanRL's losses/approx_kl (last minibatch) and SB3's
        train/approx_kl (mean over the last epoch's minibatches). A value below
        -1e-6 (a signed estimator) makes the update's KL missing and is counted as a
        telemetry error at `negative_kl`; it is checked on the host at publish.
        """
        self._check_open()
        kl = _scalar(value)
        self._keep(self.kls, kl)
        return kl

    def observe_clip_fraction(self, value: float | Tensor) -> None:
        """Record the PPO clip fraction of a minibatch or epoch; the update publishes their mean."""
        self._check_open()
        self._keep(self.clip_fractions, _scalar(value))

    def observe_entropy(self, entropies: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """Record per-head, per-step entropies (TELE-120/121/124/170); returns the joint entropy (nats).

        entropies[head] holds each step's entropy of that head's distribution and masks[head]
        its causal mask. The joint entropy sums the heads' masked entropies per step and
        averages over the steps; the update publishes the mean of its calls.
        """
        self._check_open()
        _check_head_mappings("observe_entropy", "entropy", entropies, masks, self._heads)
        return self.policy.observe_entropy(entropies, masks)

    def observe_explained_variance(self, values: Tensor, returns: Tensor) -> Tensor:
        """Record TELE-200's 1 - Var(returns - values) / Var(returns) of the rollout, before the update."""
        self._check_open()
        return self.policy.observe_explained_variance(values, returns)

    def observe_advantages(self, advantages: Tensor, mask: Tensor | None = None) -> Tensor:
        """Record TELE-140's std of the (normalised) advantages over the valid steps; returns it."""
        self._check_open()
        return self.policy.observe_advantages(advantages, mask)

    def observe_entropy_value(self, value: float | Tensor) -> Tensor:
        """Record a policy entropy (nats) a PPO library computed itself, e.g. SB3's -train/entropy_loss; no sync."""
        self._check_open()
        return self.policy.observe_entropy_value(value)

    def observe_explained_variance_value(self, value: float | Tensor) -> Tensor:
        """Record an explained variance a PPO library computed itself, e.g. SB3's train/explained_variance."""
        self._check_open()
        return self.policy.observe_explained_variance_value(value)

    def observe_ratio_max_value(self, maxima: Mapping[str, float | Tensor]) -> None:
        """Record per-head importance-ratio maxima a PPO library computed itself (TorchRL's max_ratio); no sync.

        maxima[head] is that head's largest ratio pi_new / pi_old over a minibatch. Each joins
        TELE-151's per-head max of the update (with any observe_ratios calls'; a NaN wins),
        clamped to [exp(-20), exp(20)] as observe_ratios clamps. No clip fraction comes from it.
        """
        self._check_open()
        self.policy.observe_ratio_max_value(maxima)

    def observe_action_std_value(self, value: float | Tensor) -> Tensor:
        """Record a Gaussian policy's action std a library computed itself (SB3's train/std); no host sync.

        Expected: the mean over the action dimensions of exp(log_std). The update publishes the
        mean of its calls as tele_policy_std; a policy that never calls it has no series.
        """
        self._check_open()
        return self.policy.observe_action_std_value(value)

    def observe_ratios(
        self,
        log_ratio: Mapping[str, Tensor],
        masks: Mapping[str, Tensor] | None = None,
        clip_eps: float = DEFAULT_CLIP_EPS,
    ) -> Tensor:
        """Record TELE-130's clip fraction of the joint ratio and TELE-151's per-head ratio max; returns the fraction.

        The clip fraction joins any observe_clip_fraction values in the update's mean.
        """
        self._check_open()
        _check_head_mappings("observe_ratios", "log-ratio", log_ratio, masks, self._heads)
        fraction = self.policy.observe_ratios(log_ratio, masks, clip_eps)
        self._keep(self.clip_fractions, fraction)
        return fraction

    def observe_log_probs(self, log_probs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """Record TELE-160/161's log-probability extremes of the actions taken; returns [min, max] (no host sync).

        log_probs[head] holds each step's log pi(a|s) of that head's action under the current policy
        (the minibatch's new log-probabilities), masks[head] its causal mask. The update publishes the
        smallest and largest over all heads' valid entries of all its calls, as tele_log_prob_min/max.
        """
        self._check_open()
        _check_head_mappings("observe_log_probs", "log-probability", log_probs, masks, self._heads)
        return self.policy.observe_log_probs(log_probs, masks)

    def early_stop(self) -> None:
        """Count this update as stopped early by the KL trust region."""
        self.stopped_early = True

    def _keep(self, into: list[Tensor], value: Tensor) -> None:
        if self.recording:
            into.append(value)

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("use the Update inside `with tele.update() as upd:`")


def _check_head_mappings(what: str, per_step: str, tensors: object, masks: object, heads: Sequence[str]) -> None:
    """A bare tensor where a dict of heads is expected raises saying so (iterating it would name its elements)."""
    example = heads[0] if heads else "actor"
    for name, value, kind in (("", tensors, per_step), ("masks as ", masks, "mask")):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(
                f"{what} expects {name}a dict of heads, action head -> per-step {kind} tensor "
                f"(e.g. {{{example!r}: tensor}}), got a {type(value).__name__}; action heads are {list(heads)}"
            )


def _check_clip_args(max_norm: float, norm_type: float) -> float:
    """max_norm as a float; a norm_type other than 2 raises, in both modes, naming the value."""
    if float(norm_type) != 2.0:
        raise ValueError(f"tele-exporter measures L2 norms; norm_type={norm_type} is not supported")
    return float(max_norm)


def _scalar(value: float | Tensor) -> Tensor:
    """A trainer's own value as a 0-d float64 tensor outside the graph, on its device (no host sync)."""
    return torch.as_tensor(value, dtype=torch.float64).detach().reshape(())
