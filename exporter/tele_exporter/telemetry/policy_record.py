"""The PPO policy-health signals of one update: what the trainer observed, and what is published.

PolicyRecorder keeps an update's observe_entropy / observe_explained_variance /
observe_advantages / observe_ratios results (and the values a library computed
itself: entropy, explained variance, ratio maxima, action std) as device tensors; PolicyHealth turns
them (after the update's single host transfer) into an immutable PolicyState and
keeps the entropy history of TELE-121 across updates.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..measure.policy_math import (
    KL_LOG_RATIO_CLAMP,
    advantage_std,
    check_head_tensors,
    check_tensor,
    entropy_terms,
    entropy_velocity,
    explained_variance_terms,
    head_entropy_normalized,
    log_prob_terms,
    ratio_terms,
)
from ..snapshot import PolicyState
from .packer import Packer, Unpacked

# The packer keys of the recorder's pieces.
_ENTROPY, _EXPLAINED, _ADVANTAGES, _RATIOS = "policy.entropy", "policy.explained", "policy.advantages", "policy.ratios"
_RATIO_MAXIMA, _ACTION_STD = "policy.ratio_maxima", "policy.action_std"
# A library's own ratio maximum is clamped as observe_ratios clamps log-ratios: to exp(-20) .. exp(20).
_RATIO_LOW, _RATIO_HIGH = math.exp(-KL_LOG_RATIO_CLAMP), math.exp(KL_LOG_RATIO_CLAMP)
_LOG_PROBS = "policy.log_probs"


class PolicyRecorder:
    """One update's policy observations, as small float64 device tensors (no host sync)."""

    def __init__(self, heads: Sequence[str], *, recording: bool = True) -> None:
        self.heads = tuple(heads)
        self.recording = recording  # False: compute and check for the caller, keep nothing (a disabled Telemetry)
        self.entropies: list[tuple[tuple[str, ...], Tensor]] = []
        self.explained: list[Tensor] = []
        self.advantages: list[Tensor] = []
        self.ratios: list[tuple[tuple[str, ...], Tensor]] = []
        self.ratio_maxima: list[tuple[str, Tensor]] = []
        self.action_stds: list[Tensor] = []
        self.log_probs: list[Tensor] = []

    def observe_entropy(self, entropies: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None) -> Tensor:
        check_head_tensors("observe_entropy", entropies, masks, self.heads)
        terms = entropy_terms(entropies, masks)
        if self.recording:
            self.entropies.append((tuple(entropies), terms))
        return terms[0]

    def observe_entropy_value(self, value: float | Tensor) -> Tensor:
        """A joint entropy the trainer computed itself (no per-head entropy from it)."""
        terms = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1)
        if self.recording:
            self.entropies.append(((), terms))
        return terms[0]

    def observe_explained_variance_value(self, value: float | Tensor) -> Tensor:
        """An explained variance the trainer computed itself (published as given, NaN included)."""
        ev = torch.as_tensor(value, dtype=torch.float64).detach().reshape(())
        if self.recording:
            self.explained.append(torch.stack([ev, torch.ones_like(ev)]))
        return ev

    def observe_explained_variance(self, values: Tensor, returns: Tensor) -> Tensor:
        check_tensor("observe_explained_variance: values", values)
        check_tensor("observe_explained_variance: returns", returns)
        if values.numel() != returns.numel():
            raise ValueError(
                f"observe_explained_variance: values has {values.numel()} elements, returns has {returns.numel()}"
            )
        terms = explained_variance_terms(values, returns)
        if self.recording:
            self.explained.append(terms)
        return terms[0]

    def observe_advantages(self, advantages: Tensor, mask: Tensor | None) -> Tensor:
        check_tensor("observe_advantages: advantages", advantages)
        if mask is not None and (not isinstance(mask, Tensor) or mask.shape != advantages.shape):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"observe_advantages: mask has shape {shape}, advantages has shape {tuple(advantages.shape)}"
            )
        terms = advantage_std(advantages, mask)
        if self.recording:
            self.advantages.append(terms)
        return terms[0]

    def observe_ratios(
        self, log_ratio: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None, clip_eps: float
    ) -> Tensor:
        check_head_tensors("observe_ratios", log_ratio, masks, self.heads)
        if not 0.0 < float(clip_eps) < 1.0:
            raise ValueError(f"observe_ratios: clip_eps must lie in (0, 1), got {clip_eps}")
        terms = ratio_terms(log_ratio, masks, float(clip_eps))
        if self.recording:
            self.ratios.append((tuple(log_ratio), terms))
        return terms[0]

    def observe_ratio_max_value(self, maxima: Mapping[str, float | Tensor]) -> None:
        """Per-head importance-ratio maxima a library computed itself (TorchRL's max_ratio), one value per head."""
        if not isinstance(maxima, Mapping):
            raise TypeError(
                "observe_ratio_max_value expects a dict of heads, action head -> that head's largest ratio "
                f"(e.g. {{{(self.heads or ('actor',))[0]!r}: max_ratio}}), got a {type(maxima).__name__}; "
                f"action heads are {list(self.heads)}"
            )
        kept: list[tuple[str, Tensor]] = []
        for head, value in maxima.items():
            if head not in self.heads:
                raise ValueError(
                    f"unknown head {head!r} in observe_ratio_max_value; action heads are {list(self.heads)}"
                )
            t = torch.as_tensor(value, dtype=torch.float64).detach()
            if t.numel() != 1:
                raise ValueError(
                    f"observe_ratio_max_value: head {head!r} has {t.numel()} values (shape {tuple(t.shape)}); "
                    "expected the one largest ratio"
                )
            kept.append((str(head), t.reshape(()).clamp(_RATIO_LOW, _RATIO_HIGH)))  # clamp keeps a NaN
        if self.recording:
            self.ratio_maxima.extend(kept)

    def observe_action_std_value(self, value: float | Tensor) -> Tensor:
        """A Gaussian policy's action standard deviation the library computed itself (SB3's train/std)."""
        std = torch.as_tensor(value, dtype=torch.float64).detach()
        if std.numel() != 1:
            raise ValueError(
                f"observe_action_std_value: expected one value (e.g. exp(log_std).mean()), "
                f"got {std.numel()} (shape {tuple(std.shape)})"
            )
        std = std.reshape(())
        if self.recording:
            self.action_stds.append(std)
        return std

    def observe_log_probs(self, log_probs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None) -> Tensor:
        """TELE-160/161: the smallest and largest log-probability over the heads' valid entries; returns [min, max]."""
        check_head_tensors("observe_log_probs", log_probs, masks, self.heads)
        terms = log_prob_terms(log_probs, masks)
        if self.recording:
            self.log_probs.append(terms)
        return terms[:2]

    def pack(self, packer: Packer) -> None:
        """Add every recorded tensor to the update's one host transfer."""
        for key, calls in (
            (_ENTROPY, [t for _, t in self.entropies]),
            (_EXPLAINED, self.explained),
            (_ADVANTAGES, self.advantages),
            (_RATIOS, [t for _, t in self.ratios]),
            (_RATIO_MAXIMA, [t for _, t in self.ratio_maxima]),
            (_ACTION_STD, self.action_stds),
            (_LOG_PROBS, self.log_probs),
        ):
            for t in calls:
                packer.add(key, t)

    def unpack(self, host: Unpacked) -> PolicyHost:
        """The recorded values back from the transfer, as Python floats (the publish's one read of them)."""
        return PolicyHost(
            [(heads, t) for (heads, _), t in zip(self.entropies, host.values(_ENTROPY), strict=True)],
            host.values(_EXPLAINED),
            host.values(_ADVANTAGES),
            [(heads, t) for (heads, _), t in zip(self.ratios, host.values(_RATIOS), strict=True)],
            host.values(_LOG_PROBS),
            [(head, t[0]) for (head, _), t in zip(self.ratio_maxima, host.values(_RATIO_MAXIMA), strict=True)],
            [t[0] for t in host.values(_ACTION_STD)],
        )


@dataclass(frozen=True)
class PolicyHost:
    """What a PolicyRecorder recorded, on the host."""

    entropies: list[tuple[tuple[str, ...], list[float]]]
    explained: list[list[float]]
    advantages: list[list[float]]
    ratios: list[tuple[tuple[str, ...], list[float]]]
    log_probs: list[list[float]]  # per observe_log_probs call: [min, max, valid entries]
    ratio_maxima: list[tuple[str, float]] = field(default_factory=list)
    action_stds: list[float] = field(default_factory=list)


class PolicyHealth:
    """Per-Telemetry state of the policy-health signals: action sizes and the entropy history."""

    def __init__(self, heads: Sequence[str], action_sizes: Mapping[str, int] | None, history: int) -> None:
        self.heads = tuple(heads)
        self.action_sizes = check_action_sizes(action_sizes, self.heads)
        # The joint entropy's maximum: every action head uniform over its actions; None unless all sizes are known.
        known = [self.action_sizes.get(h) for h in self.heads]
        self.max_entropy = math.fsum(math.log(n) for n in known if n) if all(known) and self.heads else None
        if self.max_entropy == 0.0:  # only one-action heads: nothing to normalise by
            self.max_entropy = None
        self._history: deque[float] = deque(maxlen=history)

    def publish(self, host: PolicyHost) -> PolicyState:
        """The update's PolicyState; appends its entropy (if any) to the history."""
        entropy = None
        head_entropy: dict[str, float] = {}
        if host.entropies:
            entropy = math.fsum(t[0] for _, t in host.entropies) / len(host.entropies)
            self._history.append(entropy)
            head_entropy = self._head_entropy(host.entropies)
        ev = [t[0] for t in host.explained if t[1] != 0.0]
        adv = [t[0] for t in host.advantages if t[1] >= 2]
        cf_high = cf_low = None
        ratio_max: dict[str, float] = {}
        head_clip: dict[str, float] = {}
        if host.ratios:
            cf_high = math.fsum(t[1] for _, t in host.ratios) / len(host.ratios)
            cf_low = math.fsum(t[2] for _, t in host.ratios) / len(host.ratios)
            ratio_max = _ratio_max(host.ratios)
            head_clip = _head_clip_fraction(host.ratios)
        for head, value in host.ratio_maxima:
            ratio_max[head] = _larger(ratio_max.get(head), value)
        stds = host.action_stds
        log_prob_min = log_prob_max = None
        if host.log_probs:
            log_prob_min = _extreme(min, [t[0] for t in host.log_probs if t[2] > 0])
            log_prob_max = _extreme(max, [t[1] for t in host.log_probs if t[2] > 0])
        history = tuple(self._history)
        return PolicyState(
            entropy=entropy,
            entropy_history=history,
            entropy_velocity=entropy_velocity(history),
            head_entropy=head_entropy,
            entropy_normalized=None if entropy is None or self.max_entropy is None else entropy / self.max_entropy,
            explained_variance=math.fsum(ev) / len(ev) if ev else None,
            advantage_std=math.fsum(adv) / len(adv) if adv else None,
            head_ratio_max=ratio_max,
            action_std=math.fsum(stds) / len(stds) if stds else None,
            clip_fraction_high=cf_high,
            clip_fraction_low=cf_low,
            head_clip_fraction=head_clip,
            log_prob_min=log_prob_min,
            log_prob_max=log_prob_max,
        )

    def _head_entropy(self, calls: list[tuple[tuple[str, ...], list[float]]]) -> dict[str, float]:
        """TELE-170 per head over all calls: masked entropy sum over valid steps, over log(n_actions)."""
        totals = dict.fromkeys(self.heads, 0.0)
        valid = dict.fromkeys(self.heads, 0.0)
        seen: set[str] = set()
        for heads, t in calls:
            k = len(heads)
            for i, name in enumerate(heads):
                totals[name] += t[1 + i]
                valid[name] += t[1 + k + i]
                seen.add(name)
        return {
            h: head_entropy_normalized(totals[h], valid[h], self.action_sizes[h])
            for h in self.heads
            if h in seen and h in self.action_sizes and valid[h] > 0 and self.action_sizes[h] > 1
        }


def _ratio_max(calls: list[tuple[tuple[str, ...], list[float]]]) -> dict[str, float]:
    """TELE-151 per head: the largest ratio over the calls in which the head had a valid step; NaN wins."""
    out: dict[str, float] = {}
    for heads, t in calls:
        k = len(heads)
        for i, name in enumerate(heads):
            if t[3 + k + i] == 0:
                continue
            out[name] = _larger(out.get(name), t[3 + i])
    return out


def _larger(old: float | None, value: float) -> float:
    """The larger of a head's ratio max so far (None: none yet) and a new one; a NaN wins."""
    return value if old is None or math.isnan(value) else (old if math.isnan(old) else max(old, value))


def _head_clip_fraction(calls: list[tuple[tuple[str, ...], list[float]]]) -> dict[str, float]:
    """Per head: the mean of its clip fraction over the calls in which it had a valid step (NaN propagates).

    The mean of per-call values, as the joint clip fraction's, and as the records' system averages its
    per-epoch per-head fractions.
    """
    values: dict[str, list[float]] = {}
    for heads, t in calls:
        k = len(heads)
        for i, name in enumerate(heads):
            if t[3 + k + i] != 0:
                values.setdefault(name, []).append(t[3 + 2 * k + i])
    return {name: math.fsum(v) / len(v) for name, v in values.items()}


def _extreme(pick: Callable[[list[float]], float], values: list[float]) -> float | None:
    """min or max of host floats where a NaN wins (Python's min and max would skip or keep it by position)."""
    if not values:
        return None
    if any(math.isnan(v) for v in values):
        return math.nan
    return pick(values)


def check_action_sizes(sizes: Mapping[str, int] | None, heads: Sequence[str]) -> dict[str, int]:
    """Action-space size per head, checked once; an error names the head with a bad size."""
    out: dict[str, int] = {}
    for name, n in (sizes or {}).items():
        if name not in heads:
            raise ValueError(f"action_sizes names head {name!r}, which is not one of the heads {list(heads)}")
        # Any integer type, numpy's too (gymnasium's Discrete(n).n is a numpy int64); bool is no count.
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"action_sizes[{name!r}] must be an int >= 1 (the head's number of actions), got {n!r}")
        out[name] = int(n)
    return out
