"""The immutable snapshot Telemetry publishes once per PPO update.

Everything a scrape, the JSON API or a test reads comes from one Snapshot, so a
reader never mixes values of two updates. Display fields (levels, arrows) are
derived from the catalog here, once, at publish time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .catalog.display import Arrow, Shown, head_trend, history_trend, show
from .catalog.labels import GRADIENT_STATES as GRADIENT_STATES
from .catalog.model import Catalog

ENTROPY_COLLAPSE = 0.1
"""TELE-124: the policy entropy is collapsed strictly below this many nats."""
DEAD_LAYER_NORM = 1e-7
"""TELE-331 (as issue #30 scales it): a layer is dead when its gradient norm stays below this all update long."""


@dataclass(frozen=True)
class PolicyState:
    """The policy-health values of the latest update; None (or a head left out) is missing."""

    entropy: float | None = None  # TELE-120, nats: mean of the update's observe_entropy calls
    entropy_history: tuple[float, ...] = ()  # oldest first, the last 10 updates with an entropy
    entropy_velocity: float | None = None  # TELE-121: slope of entropy_history, nats per update
    head_entropy: Mapping[str, float] = field(default_factory=dict)  # TELE-170, normalised to [0, 1]
    entropy_normalized: float | None = None  # the joint entropy over the action space's maximum, in [0, 1]
    explained_variance: float | None = None  # TELE-200; missing when Var(returns) == 0
    advantage_std: float | None = None  # TELE-140
    head_ratio_max: Mapping[str, float] = field(default_factory=dict)  # TELE-151
    action_std: float | None = None  # a Gaussian policy's mean exp(log_std), as the library computed it
    clip_fraction_high: float | None = None  # TELE-130's parts: r > 1 + eps
    clip_fraction_low: float | None = None  # r < 1 - eps
    head_clip_fraction: Mapping[str, float] = field(default_factory=dict)  # per head: mean(|r_h - 1| > eps)
    log_prob_min: float | None = None  # TELE-160: the smallest observed log-probability of the update
    log_prob_max: float | None = None  # TELE-161: the largest

    @property
    def entropy_collapsed(self) -> float | None:
        """TELE-124: 1.0 when entropy < 0.1 (strict), else 0.0; NaN for a NaN entropy, None while missing."""
        if self.entropy is None:
            return None
        if math.isnan(self.entropy):
            return math.nan
        return 1.0 if self.entropy < ENTROPY_COLLAPSE else 0.0


@dataclass(frozen=True)
class HeadState:
    """TELE-320/321 for one head: an action head (kind "action", in the CV) or another measured group ("other")."""

    name: str
    current: float  # NaN: missing (no gradient in the update) or non-finite data; `steps` tells which
    prev: float  # the latest earlier measured current; 0.0 until the head has been measured once
    trend: Arrow | None
    nonfinite_total: int
    steps: int = 0  # optimizer steps of the latest update in which the head had a gradient; 0: missing
    kind: str = "action"  # "action": part of the gradient CV; "other": measured and exported, not in the CV
    update_ratio: float | None = None  # |theta_after - theta_before| / |theta_before| of the update; None: missing
    nan_total: int = 0  # optimizer steps so far whose norm of this head was NaN
    inf_total: int = 0  # ... +Inf (nan_total + inf_total == nonfinite_total)
    state: str | None = None  # one of GRADIENT_STATES for the latest update; None before the first
    first_nonfinite_step: int | None = None  # the update's first non-finite step, for the head(s) non-finite there


@dataclass(frozen=True)
class LayerState:
    """One layer (a module owning parameters, or the user's group) after the latest update."""

    name: str
    grad_norm: float  # mean over the steps with a gradient, as per head; NaN: non-finite data (missing: steps == 0)
    steps: int  # optimizer steps of the latest update in which the layer had a gradient
    dead: bool  # had a gradient, and its norm stayed below DEAD_LAYER_NORM at every step of the update
    update_ratio: float | None = None  # as HeadState's; None: missing (weights all zero before, or not measured)


@dataclass(frozen=True)
class SeedState:
    """TELE-557 for one watched seed."""

    env: str
    slot: str
    ratio: float  # seed/host parameter-gradient RMS, mean over passes with data; 0.0: no gradient data
    vanishing: bool
    exploding: bool
    shown: Shown
    passes: int  # backward passes with data in the latest update
    backward_gain: float | None = None  # |dL/d input| / |dL/d output|, mean over passes with data; None: missing


@dataclass(frozen=True)
class HistogramState:
    """Cumulative bucket counts of one histogram series (Prometheus `le` semantics)."""

    edges: tuple[float, ...]
    cumulative: tuple[int, ...]  # one per edge, then +Inf
    total: float  # sum of finite observations

    @property
    def count(self) -> int:
        return self.cumulative[-1]


@dataclass(frozen=True)
class Snapshot:
    """One consistent view of the telemetry after `updates` PPO updates."""

    updates: int
    early_stops: int
    timestamp: float | None
    steps: int  # optimizer steps measured in the latest update
    heads: tuple[HeadState, ...]
    grad_norm_pre: float | None  # None (missing): no step was measured
    grad_norm_post: float | None
    grad_norm_history: tuple[float, ...]  # pre-clip, oldest first (TELE-311; a post-clip one is flat at max_norm)
    kl: float | None  # None (missing): no KL observed in the latest update
    kl_history: tuple[float, ...]  # oldest first (TELE-111)
    gradient_cv: float | None  # mean of the per-step CVs; None (missing): no step was measured
    clip_fraction: float | None = None  # None: the trainer reported none this update
    policy: PolicyState = field(default_factory=PolicyState)  # TELE-120/121/124/130/140/151/170/200
    seeds: tuple[SeedState, ...] = ()
    histograms: Mapping[str, Mapping[tuple[str, ...], HistogramState]] = field(default_factory=dict)
    seeds_refused: int = 0
    alert_scale: str = "run"  # how this run's scale-dependent signals page: "run" (own baseline) or "records"
    finished: bool = False  # the trainer said it ended cleanly (Telemetry.finish)
    layers: tuple[LayerState, ...] = ()  # Telemetry(layers=...); empty without
    dead_layers: int | None = None  # TELE-331: layers dead in the latest update; None: layers off or no step measured

    @property
    def publications(self) -> int:
        """Published updates, plus one once the run said it finished: what a lingering close() waits to see scraped."""
        return self.updates + int(self.finished)

    def head(self, name: str) -> HeadState:
        for head in self.heads:
            if head.name == name:
                return head
        raise KeyError(f"no head named {name!r}; heads are {[h.name for h in self.heads]}")

    def seed(self, env: str, slot: str) -> SeedState:
        for seed in self.seeds:
            if (seed.env, seed.slot) == (env, slot):
                return seed
        raise KeyError(f"no watched seed env={env!r} slot={slot!r}")

    def to_dict(self, catalog: Catalog) -> dict[str, Any]:
        """A JSON-ready dict with display fields; missing values are null, NaN and Inf become strings."""
        grad_spec, kl_spec, head_spec = catalog["policy_grad_norm"], catalog["kl_divergence"], catalog["head_grad_norm"]
        out: dict[str, Any] = _jsonable(
            {
                "updates": self.updates,
                "early_stops": self.early_stops,
                "timestamp": self.timestamp,
                "steps": self.steps,
                "heads": [
                    {
                        **asdict(h),
                        "current": h.current if h.steps else None,
                        # TELE-320's level of the current norm (neutral while the catalog gives the metric none)
                        "shown": asdict(show(head_spec, h.current if h.steps else None)),
                    }
                    for h in self.heads
                ],
                "grad_norm": {
                    "pre": self.grad_norm_pre,
                    "post": self.grad_norm_post,
                    "shown": asdict(show(grad_spec, self.grad_norm_pre)),
                    "history": list(self.grad_norm_history),
                    "trend": _maybe(history_trend(grad_spec, self.grad_norm_history)),
                },
                "kl": {
                    "value": self.kl,
                    "shown": asdict(show(kl_spec, self.kl)),
                    "history": list(self.kl_history),
                    "trend": _maybe(history_trend(kl_spec, self.kl_history)),
                },
                "gradient_cv": {
                    "value": self.gradient_cv,
                    "shown": asdict(show(catalog["gradient_cv"], self.gradient_cv)),
                },
                "clip_fraction": self.clip_fraction,
                "policy": _policy_dict(self.policy, catalog, self.clip_fraction),
                "seeds": [asdict(s) for s in self.seeds],
                "seeds_refused": self.seeds_refused,
                "layers": [
                    {**asdict(layer), "grad_norm": layer.grad_norm if layer.steps else None} for layer in self.layers
                ],
                "dead_layers": self.dead_layers,
                "dead_layers_shown": asdict(show(catalog["dead_layers"], self.dead_layers)),  # TELE-331's level
            }
        )
        return out


def _policy_dict(p: PolicyState, catalog: Catalog, clip_fraction: float | None) -> dict[str, Any]:
    """TELE-120/121/124/130/140/151/160/161/170/200 with their display; a head without a value is left out.

    `clip_fraction` (TELE-130) is the snapshot's own, repeated here with its level beside the others.
    """

    def shown(metric_id: str, value: float | None) -> dict[str, Any]:
        return {"value": value, "shown": asdict(show(catalog[metric_id], value))}

    entropy_spec = catalog["policy_entropy"]
    return {
        "entropy": {
            **shown("policy_entropy", p.entropy),
            "history": list(p.entropy_history),
            "trend": _maybe(history_trend(entropy_spec, p.entropy_history)),
            "collapsed": p.entropy_collapsed,
            "velocity": shown("entropy_velocity", p.entropy_velocity),
            "normalized": shown("entropy_normalized", p.entropy_normalized),
        },
        "head_entropy": {h: shown("head_entropy", v) for h, v in p.head_entropy.items()},
        "explained_variance": shown("explained_variance", p.explained_variance),
        "advantage_std": shown("advantage_std", p.advantage_std),
        "head_ratio_max": {h: shown("head_ratio_max", v) for h, v in p.head_ratio_max.items()},
        "action_std": shown("policy_std", p.action_std),
        "clip_fraction": shown("clip_fraction", clip_fraction),
        "clip_fraction_side": {"high": p.clip_fraction_high, "low": p.clip_fraction_low},
        "head_clip_fraction": {h: shown("head_clip_fraction", v) for h, v in p.head_clip_fraction.items()},
        "log_prob": {"min": shown("log_prob_min", p.log_prob_min), "max": shown("log_prob_max", p.log_prob_max)},
    }


def _maybe(arrow: Arrow | None) -> dict[str, str] | None:
    return None if arrow is None else asdict(arrow)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Inf" if value > 0 else "-Inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def empty_snapshot(heads: tuple[tuple[str, str], ...]) -> Snapshot:
    """The snapshot before the first update: nothing measured yet; heads are (name, kind)."""
    return Snapshot(
        updates=0,
        early_stops=0,
        timestamp=None,
        steps=0,
        heads=tuple(HeadState(name, math.nan, 0.0, None, 0, kind=kind) for name, kind in heads),
        grad_norm_pre=None,
        grad_norm_post=None,
        grad_norm_history=(),
        kl=None,
        kl_history=(),
        gradient_cv=None,
    )


def head_state(
    catalog: Catalog,
    name: str,
    current: float,
    prev: float,
    nonfinite: int,
    steps: int,
    kind: str = "action",
    update_ratio: float | None = None,
    **provenance: Any,
) -> HeadState:
    """TELE-320/321 of one head with its trend arrow; `provenance`: nan_total, inf_total, state, first step."""
    trend = head_trend(catalog["head_grad_norm_prev"], current, prev)
    return HeadState(name, current, prev, trend, nonfinite, steps, kind, update_ratio, **provenance)
