"""Telemetry: the aggregator a PPO trainer talks to.

It owns the gradient meter and the seed probes, turns what they recorded during
one PPO update into an immutable Snapshot (current, prev, histories, trends,
histograms) with at most one host transfer per device, and swaps it in under a
lock, so a scrape never sees half an update and never blocks the training thread
for more than that swap.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

import torch
from prometheus_client import CollectorRegistry
from torch import Tensor, nn

from ..catalog.display import Shown, show
from ..catalog.labels import check_label_names
from ..catalog.model import Catalog, default_catalog
from ..catalog.thresholds import Thresholds, resolve
from ..measure.heads import ACTION, Head, HeadSpec, resolve_heads
from ..measure.meter import Drained, GradientMeter, NonFiniteNormError
from ..measure.norms import backward_gain, seed_rms_ratio, stack_float64, step_cvs
from ..measure.policy_math import DEFAULT_CLIP_EPS, approx_kl
from ..measure.seed_probes import BackwardPass, HostPasses, HostProbe, SeedKey, SeedProbe
from ..measure.sharding import LegacyFSDPError, refuse_legacy_fsdp, refuse_sharded_rows
from ..snapshot import HeadState, SeedState, Snapshot, empty_snapshot, head_state
from .histograms import LabelledHistogram
from .policy_record import PolicyHealth, PolicyRecorder

log = logging.getLogger("tele_exporter")

_STEP_HISTOGRAMS = (
    "step_head_grad_norm",
    "step_policy_grad_norm",
    "step_kl_divergence",
    "step_seed_grad_ratio",
    "step_policy_entropy",
    "step_clip_fraction",
)

DEFAULT_MAX_SEEDS = 1024

DISABLED_ENV = "TELE_EXPORTER_DISABLED"

KL_ROUNDOFF = 1e-6
"""Negative KL values down to -KL_ROUNDOFF are float32 rounding of a non-negative estimator, taken as 0.0."""

_UNMEASURED_HINT = (
    "a Telemetry update saw gradients but measured no optimizer step, so gradient norms are missing: "
    "clip with upd.clip_grad_norm_(max_norm) instead of torch.nn.utils.clip_grad_norm_, "
    "or call upd.observe_gradients() before optimizer.step()"
)


class Telemetry:
    """Training-health telemetry for one policy: per-head gradients, KL, CV and seeds.

    `heads` maps names to the action heads: a submodule, or `(module, slice)` for
    rows of its output (a sub-action's logits); their norms enter the gradient CV.
    `groups` names other measured parts (critic, value head) the same way: exported
    with kind="other", left out of the CV. Every parameter must belong to `policy`;
    heads may overlap. `action_sizes` maps an action head to its number of actions,
    the maximum entropy log(n) of TELE-170's normalised per-head entropy (heads left
    out report none). A new CollectorRegistry is created unless one is passed in.
    With `enabled=False`, or when the
    environment sets TELE_EXPORTER_DISABLED=1, every call is a cheap no-op (see README).
    `thresholds` (signal -> level -> start) and `thresholds_file` (or $TELE_EXPORTER_THRESHOLDS)
    move this run's level boundaries; the alert rules, the page and /api/snapshot follow them.
    """

    def __init__(
        self,
        policy: nn.Module,
        heads: Mapping[str, HeadSpec],
        registry: CollectorRegistry | None = None,
        const_labels: Mapping[str, str] | None = None,
        *,
        groups: Mapping[str, HeadSpec] | None = None,
        catalog: Catalog | None = None,
        max_seeds: int = DEFAULT_MAX_SEEDS,
        enabled: bool | None = None,
        thresholds: Thresholds | None = None,
        thresholds_file: str | Path | None = None,
        action_sizes: Mapping[str, int] | None = None,
    ) -> None:
        if not isinstance(policy, nn.Module):
            raise TypeError(f"Telemetry needs the policy as an nn.Module, got {type(policy).__name__}")
        self.catalog = resolve(catalog if catalog is not None else default_catalog(), thresholds, thresholds_file)
        resolved = resolve_heads(heads, groups)
        self.heads: dict[str, HeadSpec] = dict(heads)
        self.groups: dict[str, HeadSpec] = dict(groups or {})
        params = list(dict.fromkeys(policy.parameters()))
        refuse_legacy_fsdp(params, policy)
        owned = {id(p) for p in params}
        for head in resolved:
            if any(id(p) not in owned for p in head.params):
                raise ValueError(f"head {head.name!r} has parameters that are not part of the policy")
            if not head.params:
                log.warning("head %r has no parameters: its gradient norm will always be missing", head.name)
            if head.rows is not None:
                for p in head.params:
                    refuse_sharded_rows(p, [head.name])
        self._heads: list[Head] = resolved
        self._actions = sum(h.kind == ACTION for h in resolved)  # action heads come first
        self.params = params
        self.const_labels = _check_const_labels(const_labels, self.catalog)
        if max_seeds < 0:
            raise ValueError(f"max_seeds must be >= 0, got {max_seeds}")
        self.max_seeds = max_seeds

        self._meter = GradientMeter(params, resolved)
        self._lock = threading.Lock()
        self._snapshot = empty_snapshot(tuple((h.name, h.kind) for h in resolved))
        self._grad_history: deque[float] = deque(maxlen=self.catalog["policy_grad_norm"].history)
        self._kl_history: deque[float] = deque(maxlen=self.catalog["kl_divergence"].history)
        self._policy = PolicyHealth(tuple(self.heads), action_sizes, self.catalog["policy_entropy"].history)
        self._nonfinite = {h.name: 0 for h in resolved}
        self._histograms = {
            spec.id: LabelledHistogram(spec.buckets) for spec in self.catalog if spec.type == "histogram"
        }
        for required in _STEP_HISTOGRAMS:  # a custom catalog without one is named, not a bare KeyError
            self._histograms.setdefault(required, LabelledHistogram(self.catalog[required].buckets))
        for head in resolved:
            self._histograms["step_head_grad_norm"].ensure((head.name, head.kind))
        for clip in ("pre", "post"):
            self._histograms["step_policy_grad_norm"].ensure((clip,))
        self._histograms["step_kl_divergence"].ensure(())
        self._histograms["step_seed_grad_ratio"].ensure(())
        self._histograms["step_policy_entropy"].ensure(())
        self._histograms["step_clip_fraction"].ensure(())
        self._seeds: dict[tuple[str, str], SeedWatch] = {}
        self._hosts: dict[int, HostProbe] = {}
        self._last_measured: dict[str, float] = {}
        self._seeds_refused = 0
        self._errors: dict[str, int] = {}
        self._update: Update | None = None
        self._hinted_unmeasured = False
        self.enabled = _enabled(enabled)

        from ..server.collector import TeleCollector  # the collector reads Telemetry; import late

        self.owns_registry = registry is None  # nothing but this Telemetry writes to it
        self.registry = registry if registry is not None else CollectorRegistry()
        self._collector = TeleCollector(self)
        if self.enabled:
            self.registry.register(self._collector)

    # -- the public API --------------------------------------------------------------

    def update(self) -> Update:
        """A context manager for one PPO update; the snapshot is published on exit."""
        return Update(self) if self.enabled else _DisabledUpdate(self)

    def watch_seed(
        self, module: nn.Module, *, host: nn.Module, env: str | int, slot: str, backward_gain: bool = False
    ) -> SeedWatch:
        """Measure TELE-557 for a seed module grown in `host` until the handle is removed.

        Per backward pass: the seed's parameter-gradient RMS over the host's (the
        host's parameters without any watched seed's), and, with backward_gain=True,
        the seed's backward gain: forward hooks and two gradient hooks per seed that
        cost more than the ratio itself, for a diagnostic without levels, so it is opt-in.
        Past `max_seeds` live seeds the call is refused and counted: the returned
        handle is inert and training goes on.
        """
        key = (str(env), str(slot))
        if not isinstance(module, nn.Module):
            raise TypeError(f"watch_seed needs an nn.Module, got {type(module).__name__}")
        if not isinstance(host, nn.Module):
            raise TypeError(f"watch_seed needs the host as an nn.Module, got {type(host).__name__}")
        if not self.enabled:
            return SeedWatch(self, key, None, None)
        with self._lock:
            if key in self._seeds:
                raise ValueError(f"a seed is already watched at env={key[0]!r} slot={key[1]!r}")
            if len(self._seeds) >= self.max_seeds:
                self._seeds_refused += 1
                refused = self._seeds_refused
                self._set_seeds_locked()
            else:
                refused = 0
        if refused:
            if refused == 1:
                log.warning("max_seeds=%d live seeds reached: further seeds are not watched", self.max_seeds)
            return SeedWatch(self, key, None, None)
        probe = self._hosts.get(id(host))
        if probe is None:
            probe = self._hosts[id(host)] = HostProbe(host, self.record_error)
        try:
            probe.add(key, module)
        except Exception:
            if probe.empty:
                del self._hosts[id(host)]
            raise
        gain = SeedProbe(module, self.record_error) if backward_gain else None
        watch = SeedWatch(self, key, gain, probe)
        with self._lock:
            self._seeds[key] = watch
            self._set_seeds_locked()
        return watch

    def snapshot(self) -> Snapshot:
        """The latest published snapshot (immutable)."""
        return self._snapshot

    def errors(self) -> dict[str, int]:
        """Exceptions caught inside telemetry, by site."""
        with self._lock:
            return dict(self._errors)

    def record_error(self, site: str, exc: BaseException) -> None:
        """Count a failure inside telemetry and log it the first time it happens at `site`."""
        with self._lock:
            self._errors[site] = self._errors.get(site, 0) + 1
            first = self._errors[site] == 1
        if first:
            log.warning("telemetry failed in %s; training goes on: %r", site, exc, exc_info=exc)

    def close(self) -> None:
        """Unregister from the registry and remove every seed's hooks."""
        for watch in list(self._seeds.values()):
            watch.remove()
        with contextlib.suppress(KeyError):
            self.registry.unregister(self._collector)

    # -- internals -------------------------------------------------------------------

    def _drop_seed(self, key: tuple[str, str], watch: SeedWatch, host: HostProbe) -> None:
        host.discard(key)
        if host.empty and self._hosts.get(id(host.host)) is host:
            del self._hosts[id(host.host)]
        with self._lock:
            if self._seeds.get(key) is watch:
                del self._seeds[key]
                self._set_seeds_locked()

    def _set_seeds_locked(self) -> None:
        """Republish the seed list (new seeds show 0.0, no data; removed ones vanish) without an update."""
        old = {(s.env, s.slot): s for s in self._snapshot.seeds}
        seeds = tuple(old.get(key) or _seed_state(self.catalog, key, _NO_SEED_DATA) for key in self._seeds)
        self._snapshot = replace(self._snapshot, seeds=seeds, seeds_refused=self._seeds_refused)

    def _open(self, upd: Update) -> None:
        if self._update is not None:
            raise RuntimeError("a Telemetry update is already open; updates do not nest")
        self._update = upd

    def _close(self, upd: Update) -> None:
        self._update = None
        try:
            self._publish(upd)
        except Exception as exc:
            self.record_error("publish", exc)

    def _publish(self, upd: Update) -> None:
        drained = self._meter.drain()
        gains = {key: watch.drain() for key, watch in list(self._seeds.items())}
        host_passes = {id(probe): probe.drain() for probe in list(self._hosts.values())}
        host = _to_host(drained, upd.kls, upd.clip_fractions, gains, host_passes, upd.policy.parts())
        policy_host = upd.policy.split(host.policy)
        policy = self._policy.publish(policy_host)
        if policy_host.entropies:
            joint = torch.stack([t[0] for _, t in policy_host.entropies])
            self._histograms["step_policy_entropy"].observe_many((), joint)
        present = _present(drained, len(self._heads))
        heads, steps = self._head_values(present, host.rows)
        if not upd.measure_calls and not self._hinted_unmeasured and any(p.grad is not None for p in self.params):
            self._hinted_unmeasured = True
            log.warning(_UNMEASURED_HINT)
        pre = post = cv = None
        if steps:
            pre, post = float(host.rows[:, -2].mean()), float(host.rows[:, -1].mean())
            self._histograms["step_policy_grad_norm"].observe_many(("pre",), host.rows[:, -2])
            self._histograms["step_policy_grad_norm"].observe_many(("post",), host.rows[:, -1])
            actions = self._actions  # TELE-330 compares action heads only
            cv = float(step_cvs(host.rows[:, :actions], present[:, :actions]).mean())
        kls = self._checked_kls(host.kls)
        kl = float(kls.mean()) if kls.numel() else None
        clip_fraction = float(host.clip_fractions.mean()) if host.clip_fractions.numel() else None
        self._histograms["step_kl_divergence"].observe_many((), kls)
        self._histograms["step_clip_fraction"].observe_many((), host.clip_fractions)
        seed_values: dict[SeedKey, SeedValues] = {}
        all_ratios = _seed_ratios(host.host_passes)
        for key in self._seeds:
            ratios = all_ratios.get(key, torch.zeros(0, dtype=torch.float64))
            with_data = ratios[ratios != 0]
            self._histograms["step_seed_grad_ratio"].observe_many((), with_data)
            gain = host.gains.get(key, torch.zeros(0, dtype=torch.float64))
            seed_values[key] = SeedValues(
                float(with_data.mean()) if with_data.numel() else 0.0,
                int(with_data.numel()),
                float(gain.mean()) if gain.numel() else None,
            )

        with self._lock:
            old = self._snapshot
            if post is not None:
                self._grad_history.append(post)
            if kl is not None:
                self._kl_history.append(kl)
            seeds = tuple(_seed_state(self.catalog, key, seed_values.get(key, _NO_SEED_DATA)) for key in self._seeds)
            self._snapshot = Snapshot(
                updates=old.updates + 1,
                early_stops=old.early_stops + int(upd.stopped_early),
                timestamp=time.time(),
                steps=steps,
                heads=tuple(self._head_state(h, heads[h.name]) for h in old.heads),
                grad_norm_pre=pre,
                grad_norm_post=post,
                grad_norm_history=tuple(self._grad_history),
                kl=kl,
                kl_history=tuple(self._kl_history),
                gradient_cv=cv,
                clip_fraction=clip_fraction,
                policy=policy,
                seeds=seeds,
                histograms={hid: h.states() for hid, h in self._histograms.items()},
                seeds_refused=self._seeds_refused,
            )

    def _checked_kls(self, kls: Tensor) -> Tensor:
        """The update's KL values on the host; rounding negatives become 0.0, a real negative refuses them all.

        A value below -KL_ROUNDOFF cannot come from the expected non-negative
        estimator: the update's KL is missing, counted at site `negative_kl`, logged once.
        """
        negative = kls < -KL_ROUNDOFF
        if bool(negative.any()):
            self.record_error(
                "negative_kl",
                ValueError(
                    f"{int(negative.sum())} of this update's {kls.numel()} KL values are negative "
                    f"(min {float(kls.min()):.3g}); observe_kl_value expects the non-negative estimator "
                    "mean(exp(r) - 1 - r) with r = new_logp - old_logp (CleanRL's and SB3's approx_kl), "
                    "not a signed one such as mean(old_logp - new_logp); this update's KL is missing"
                ),
            )
            return kls[:0]
        return kls.clamp(min=0.0)

    def _head_state(self, old: HeadState, measured: tuple[float, int]) -> HeadState:
        """TELE-320/321 after this update: prev is the latest earlier measured value, never a missing one."""
        current, steps = measured
        prev = self._last_measured.get(old.name, 0.0)
        if steps:
            self._last_measured[old.name] = current
        return head_state(self.catalog, old.name, current, prev, self._nonfinite[old.name], steps, old.kind)

    def _head_values(self, present: Tensor, rows: Tensor) -> tuple[dict[str, tuple[float, int]], int]:
        """Per head: (mean over the steps where it had a gradient, how many); (NaN, 0) where it never did."""
        values = {head.name: (math.nan, 0) for head in self._heads}
        if not present.shape[0]:
            return values, 0
        hist = self._histograms["step_head_grad_norm"]
        for h, head in enumerate(self._heads):
            vals = rows[present[:, h], h]
            if vals.numel():
                values[head.name] = (float(vals.mean()), int(vals.numel()))
                self._nonfinite[head.name] += int((~torch.isfinite(vals)).sum())
                hist.observe_many((head.name, head.kind), vals)
        return values, int(present.shape[0])


class Update:
    """One PPO update. Measure each optimizer step, observe KL, publish on exit."""

    def __init__(self, tele: Telemetry) -> None:
        self._tele = tele
        self.kls: list[Tensor] = []
        self.clip_fractions: list[Tensor] = []
        self.policy = PolicyRecorder(tuple(tele.heads))
        self.stopped_early = False
        self.measure_calls = 0
        self._open = False

    def __enter__(self) -> Update:
        self._tele._open(self)
        self._open = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        self._tele._close(self)

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> Tensor:
        """Drop-in for torch.nn.utils.clip_grad_norm_ over the policy's parameters.

        Clips in place and returns the pre-clip total norm as a new float64 tensor;
        per-head norms come from the same fused pass. With error_if_nonfinite a
        NaN or Inf total raises before any gradient is touched, as torch does. If
        the measurement itself fails, the step is missing and torch clips instead;
        under legacy FSDP it raises, since torch would clip by one shard's norm.
        """
        self._check_open()
        self.measure_calls += 1
        if float(norm_type) != 2.0:
            raise ValueError(f"tele-exporter measures L2 norms; norm_type={norm_type} is not supported")
        try:
            return self._tele._meter.measure(float(max_norm), error_if_nonfinite=error_if_nonfinite, foreach=foreach)
        except (NonFiniteNormError, LegacyFSDPError):
            raise
        except Exception as exc:
            self._tele.record_error("clip_grad_norm", exc)
            return torch.nn.utils.clip_grad_norm_(
                self._tele.params, max_norm, error_if_nonfinite=error_if_nonfinite, foreach=foreach
            )

    def observe_gradients(self) -> Tensor:
        """Measure this step's gradients without clipping; returns the total norm (NaN if it cannot be measured)."""
        self._check_open()
        self.measure_calls += 1
        try:
            return self._tele._meter.measure(None)
        except Exception as exc:
            self._tele.record_error("observe_gradients", exc)
            return torch.tensor(math.nan, dtype=torch.float64)

    def observe_kl(self, log_ratio: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """Record a causally weighted approx KL (TELE-111) from per-head log-ratios and return it as a tensor.

        r = new_logp - old_logp per head; each head's KL is the mean of exp(r) - 1 - r
        over its valid steps. The update publishes the mean of all its observe_* calls.
        """
        self._check_open()
        unknown = [h for h in (*log_ratio, *(masks or {})) if h not in self._tele.heads]
        if unknown:
            raise ValueError(f"unknown head {unknown[0]!r} in observe_kl; action heads are {list(self._tele.heads)}")
        kl = approx_kl(log_ratio, masks)
        self.kls.append(kl.detach())
        return kl

    def observe_kl_value(self, value: float | Tensor) -> Tensor:
        """Record an approx KL the trainer computed itself (e.g. a PPO library's own); no host sync.

        Expected: the non-negative estimator mean(exp(r) - 1 - r), r = new_logp - old_logp,
        as CleanRL's and SB3's approx_kl. The update publishes the mean of all its
        observe_kl / observe_kl_value calls, so one call per update with the logged
        value reproduces CleanRL's losses/approx_kl (last minibatch) and SB3's
        train/approx_kl (mean over the last epoch's minibatches). A value below -KL_ROUNDOFF (a signed estimator)
        makes the update's KL missing and is counted as a telemetry error at
        `negative_kl`; it is checked on the host at publish.
        """
        self._check_open()
        kl = torch.as_tensor(value, dtype=torch.float64).detach().reshape(())
        self.kls.append(kl)
        return kl

    def observe_clip_fraction(self, value: float | Tensor) -> None:
        """Record the PPO clip fraction of a minibatch or epoch; the update publishes their mean."""
        self._check_open()
        self.clip_fractions.append(torch.as_tensor(value, dtype=torch.float64).detach().reshape(()))

    def observe_entropy(self, entropies: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """Record per-head, per-step entropies (TELE-120/121/124/170); returns the joint entropy (nats).

        entropies[head] holds each step's entropy of that head's distribution and masks[head]
        its causal mask. The joint entropy sums the heads' masked entropies per step and
        averages over the steps; the update publishes the mean of its calls.
        """
        self._check_open()
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
        fraction = self.policy.observe_ratios(log_ratio, masks, clip_eps)
        self.clip_fractions.append(fraction)
        return fraction

    def early_stop(self) -> None:
        """Count this update as stopped early by the KL trust region."""
        self.stopped_early = True

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("use the Update inside `with tele.update() as upd:`")


class _DisabledUpdate(Update):
    """An Update of a disabled Telemetry: clips with torch, returns what the enabled one would, records nothing."""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        self._tele._update = None

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ over the policy's parameters."""
        self._check_open()
        return torch.nn.utils.clip_grad_norm_(
            self._tele.params, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite, foreach=foreach
        )

    def observe_gradients(self) -> Tensor:
        """The total L2 norm of the policy's gradients, as the enabled Update returns it."""
        self._check_open()
        grads = [p.grad for p in self._tele.params if p.grad is not None]
        if not grads:
            return torch.tensor(math.nan, dtype=torch.float64)
        return torch.nn.utils.get_total_norm(grads).to(torch.float64)

    def observe_kl(self, log_ratio: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """TELE-111 approx KL, computed for the caller (e.g. for early stopping) and not recorded."""
        self._check_open()
        return approx_kl(log_ratio, masks)

    def observe_kl_value(self, value: float | Tensor) -> Tensor:
        """The value as a float64 tensor, not recorded."""
        self._check_open()
        return torch.as_tensor(value, dtype=torch.float64).detach().reshape(())

    def observe_clip_fraction(self, value: float | Tensor) -> None:
        """Nothing: a disabled Telemetry records no clip fraction."""
        self._check_open()

    def observe_entropy(self, entropies: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """The joint entropy, computed for the caller and not recorded."""
        self._check_open()
        return PolicyRecorder(tuple(self._tele.heads)).observe_entropy(entropies, masks)

    def observe_explained_variance(self, values: Tensor, returns: Tensor) -> Tensor:
        """The explained variance, computed for the caller and not recorded."""
        self._check_open()
        return PolicyRecorder(()).observe_explained_variance(values, returns)

    def observe_advantages(self, advantages: Tensor, mask: Tensor | None = None) -> Tensor:
        """The advantages' std, computed for the caller and not recorded."""
        self._check_open()
        return PolicyRecorder(()).observe_advantages(advantages, mask)

    def observe_entropy_value(self, value: float | Tensor) -> Tensor:
        """The value as a float64 tensor, not recorded."""
        self._check_open()
        return torch.as_tensor(value, dtype=torch.float64).detach().reshape(())

    def observe_explained_variance_value(self, value: float | Tensor) -> Tensor:
        """The value as a float64 tensor, not recorded."""
        self._check_open()
        return torch.as_tensor(value, dtype=torch.float64).detach().reshape(())

    def observe_ratios(
        self,
        log_ratio: Mapping[str, Tensor],
        masks: Mapping[str, Tensor] | None = None,
        clip_eps: float = DEFAULT_CLIP_EPS,
    ) -> Tensor:
        """The clip fraction, computed for the caller and not recorded."""
        self._check_open()
        return PolicyRecorder(tuple(self._tele.heads)).observe_ratios(log_ratio, masks, clip_eps)


def _enabled(enabled: bool | None) -> bool:
    """An explicit `enabled` wins; else telemetry is on unless TELE_EXPORTER_DISABLED is set to anything but 0 or ''."""
    if enabled is not None:
        return bool(enabled)
    return os.environ.get(DISABLED_ENV, "").strip() in ("", "0")


class SeedWatch:
    """Handle of a watched seed; remove() (idempotent) drops its hooks and its series."""

    def __init__(self, tele: Telemetry, key: tuple[str, str], probe: SeedProbe | None, host: HostProbe | None) -> None:
        self._tele = tele
        self.env, self.slot = key
        self._probe = probe
        self._host = host
        self._removed = False

    @property
    def active(self) -> bool:
        """False once removed, or when the watch was refused by the seed cap."""
        return self._host is not None and not self._removed

    def drain(self) -> list[BackwardPass]:
        """The backward-gain passes recorded since the last drain."""
        return self._probe.drain() if self._probe is not None else []

    def remove(self) -> None:
        if self._host is None or self._removed:
            return
        self._removed = True
        if self._probe is not None:
            self._probe.remove()
        self._tele._drop_seed((self.env, self.slot), self, self._host)

    def __enter__(self) -> SeedWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


@dataclass(frozen=True)
class SeedValues:
    """One seed's TELE-557 values of an update: mean ratio and passes with data, mean backward gain."""

    ratio: float
    passes: int
    backward_gain: float | None  # None: not measured (no probe, or no pass with data)


_NO_SEED_DATA = SeedValues(0.0, 0, None)
PassSums = tuple[tuple[SeedKey, ...], tuple[int, ...], Tensor]  # a pass's seeds, parameter counts and float64 sums


@dataclass(frozen=True)
class _Host:
    """What one update recorded, on the host."""

    rows: Tensor
    kls: Tensor
    clip_fractions: Tensor
    gains: dict[SeedKey, Tensor]
    host_passes: list[PassSums]  # each backward pass of a watched host, its sums on the host
    policy: Tensor  # PolicyRecorder.parts(), concatenated


def _present(drained: Drained | None, heads: int) -> Tensor:
    """[steps, heads] bool: which head had a gradient at which recorded step."""
    if drained is None:
        return torch.zeros(0, heads, dtype=torch.bool)
    return torch.tensor(drained.present, dtype=torch.bool).reshape(len(drained.present), heads)


def _to_host(
    drained: Drained | None,
    kls: list[Tensor],
    clip_fractions: list[Tensor],
    gains: Mapping[SeedKey, list[BackwardPass]],
    host_passes: Mapping[int, list[HostPasses]],
    policy: list[Tensor],
) -> _Host:
    """Gather everything the update recorded and copy it to the host, one transfer per device."""
    parts: list[Tensor] = []
    if drained is not None:
        parts.append(drained.rows.reshape(-1))
    parts.extend(k.reshape(1) for k in kls)
    parts.extend(c.reshape(1) for c in clip_fractions)
    gain_sides: list[tuple[SeedKey, list[int]]] = []  # per seed: per norm, 2 * pass (input) or 2 * pass + 1 (output)
    for key, seed_passes in gains.items():
        complete = [p for p in seed_passes if p.input_norms and p.output_norms]
        sides = [2 * i + side for i, p in enumerate(complete) for side, ns in enumerate(_sides(p)) for _ in ns]
        gain_sides.append((key, sides))
        if complete:
            parts.append(stack_float64([n for p in complete for ns in _sides(p) for n in ns]))
    blocks = [b for probe_blocks in host_passes.values() for b in probe_blocks]
    parts.extend(sums for b in blocks for sums in b.squares)
    parts.extend(t.reshape(-1) for t in policy)
    flat = _gather(parts)
    width = drained.rows.shape[1] if drained is not None else 0
    n_rows = drained.rows.shape[0] if drained is not None else 0
    rows = flat[: n_rows * width].reshape(n_rows, width)
    offset = n_rows * width
    kl_t = flat[offset : offset + len(kls)]
    offset += len(kls)
    clip_t = flat[offset : offset + len(clip_fractions)]
    offset += len(clip_fractions)
    gain_t: dict[SeedKey, Tensor] = {}
    for key, sides in gain_sides:
        squares = flat[offset : offset + len(sides)].square()
        offset += len(sides)
        n_passes = (max(sides) + 2) // 2 if sides else 0
        index = torch.tensor(sides, dtype=torch.long)
        sums = torch.zeros(2 * n_passes, dtype=torch.float64).index_add_(0, index, squares)
        g_in, g_out = sums[0::2].sqrt(), sums[1::2].sqrt()
        gain_t[key] = backward_gain(g_in, g_out)[g_out != 0]  # no output gradient: no data; a gain of 0 is data
    on_host: list[PassSums] = []
    for b in blocks:
        n = b.size
        per_device = [flat[offset + k * n : offset + (k + 1) * n] for k in range(len(b.squares))]
        on_host.extend(b.per_pass(per_device[0] if len(per_device) == 1 else torch.stack(per_device).sum(0)))
        offset += n * len(b.squares)
    return _Host(rows, kl_t, clip_t, gain_t, on_host, flat[offset:])


def _seed_ratios(passes: list[PassSums]) -> dict[SeedKey, Tensor]:
    """TELE-557 ratio of every seed at each recorded backward pass that covered it (0.0: no data)."""
    columns: dict[SeedKey, tuple[list[float], list[float], list[int], list[int]]] = {}
    for seeds, numels, squares in passes:
        values = squares.tolist()
        for col, key in enumerate(seeds, start=1):
            seed_sq, host_sq, seed_n, host_n = columns.setdefault(key, ([], [], [], []))
            seed_sq.append(values[col])
            host_sq.append(values[0])
            seed_n.append(numels[col])
            host_n.append(numels[0])
    return {
        key: seed_rms_ratio(
            torch.tensor(seed_sq, dtype=torch.float64).sqrt(),
            torch.tensor(seed_n, dtype=torch.float64),
            torch.tensor(host_sq, dtype=torch.float64).sqrt(),
            torch.tensor(host_n, dtype=torch.float64),
        )
        for key, (seed_sq, host_sq, seed_n, host_n) in columns.items()
    }


def _sides(record: BackwardPass) -> tuple[list[Tensor], list[Tensor]]:
    return record.input_norms, record.output_norms


def _gather(parts: list[Tensor]) -> Tensor:
    """Concatenate float64 pieces in order on the host with one copy per device."""
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    devices = list(dict.fromkeys(p.device for p in parts))
    if len(devices) == 1:
        return torch.cat([p.to(torch.float64) for p in parts]).cpu()
    host = {d: torch.cat([p.to(torch.float64) for p in parts if p.device == d]).cpu() for d in devices}
    cursor = dict.fromkeys(devices, 0)
    out = []
    for p in parts:
        n = p.numel()
        out.append(host[p.device][cursor[p.device] : cursor[p.device] + n])
        cursor[p.device] += n
    return torch.cat(out)


def _seed_state(catalog: Catalog, key: tuple[str, str], values: SeedValues) -> SeedState:
    """A seed's display state; a NaN ratio (non-finite gradients) is exploding, like Inf."""
    spec = catalog["seed_grad_ratio"]
    level = spec.level_of(math.inf if math.isnan(values.ratio) else values.ratio)
    flag = level.flag if level is not None else None
    shown = show(spec, values.ratio)
    if level is not None:
        shown = Shown(level.name, level.render(values.ratio, spec.precision), level.status)
    return SeedState(
        env=key[0],
        slot=key[1],
        ratio=values.ratio,
        vanishing=flag == "seed_gradient_vanishing",
        exploding=flag == "seed_gradient_exploding",
        shown=shown,
        passes=values.passes,
        backward_gain=values.backward_gain,
    )


def _distributed_rank() -> int | None:
    """This process's rank under torch.distributed with more than one process, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return int(dist.get_rank())
    return None


def _check_const_labels(labels: Mapping[str, str] | None, catalog: Catalog) -> dict[str, str]:
    out = {str(k): str(v) for k, v in (labels or {}).items()}
    rank = _distributed_rank()
    if rank is not None:
        out.setdefault("rank", str(rank))
    try:
        check_label_names(out, {label for spec in catalog for label in spec.labels}, "a catalog metric")
    except ValueError as exc:
        raise ValueError(f"const {exc}") from None
    return out
