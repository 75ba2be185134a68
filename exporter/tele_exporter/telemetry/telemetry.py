"""Telemetry: the facade a PPO trainer talks to, wiring the meter, the seeds, the fold and the collector.

It checks its settings, hands each Update and SeedWatch only the collaborators they
need, and swaps each folded Snapshot in under a lock, so a scrape never sees half an
update and never blocks the training thread for more than that swap.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from prometheus_client import CollectorRegistry
from torch import nn

from ..catalog import Catalog, default_catalog
from ..catalog.thresholds import THRESHOLDS_ENV, Thresholds, resolve
from ..measure.heads import Head, HeadSpec
from ..measure.layers import DEFAULT_MAX_LAYERS, LayersSpec
from ..measure.meter import GradientMeter
from ..measure.update_ratio import WeightDelta
from ..server.collector import TeleCollector
from ..snapshot import Snapshot, empty_snapshot
from . import settings
from .errors import ErrorCounter
from .fold import Fold, Recorded
from .launch import launch_info
from .policy_record import PolicyHealth
from .seeds import NO_SEED_DATA, SeedRegistry, SeedWatch, seed_state
from .update import Update

DEFAULT_MAX_SEEDS = 1024
SCALES = ("run", "records")
DISABLED_ENV = settings.DISABLED_ENV

__all__ = ["DEFAULT_MAX_SEEDS", "DISABLED_ENV", "SeedWatch", "Telemetry", "Update"]


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
    `scale` says how the scale-dependent signals (gradient norms, CV, KL, advantage std, entropy
    in nats, ratio maxima) page: "run" (the default) against this run's own baseline, "records" on the TELE
    records' absolute levels, for trainers on the records' scale (the demo), and the default
    for a run that moves its levels (`thresholds`, a thresholds file): those levels page;
    exported as tele_alert_scale_info. Call `finish()` once training ended cleanly.
    `layers=True` measures every module that owns parameters (named by its module path), or
    `layers={name: module}` the user's grouping: tele_layer_grad_norm, tele_dead_layers and
    tele_layer_update_ratio from the clip's own per-tensor norms (no launch per step); more
    than `max_layers` layers are refused at construction. `update_ratio` (on by default) keeps
    one device copy of the parameters per update for tele_head_update_ratio (docs/layers.md).
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
        scale: str | None = None,
        layers: LayersSpec = None,
        max_layers: int = DEFAULT_MAX_LAYERS,
        update_ratio: bool = True,
    ) -> None:
        if not isinstance(policy, nn.Module):
            raise TypeError(f"Telemetry needs the policy as an nn.Module, got {type(policy).__name__}")
        if scale is None:  # a run that sets its own levels wants them to page: the records' way, at its levels
            moved = thresholds is not None or thresholds_file is not None or bool(os.environ.get(THRESHOLDS_ENV))
            scale = "records" if moved else "run"
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
        self.catalog = resolve(catalog if catalog is not None else default_catalog(), thresholds, thresholds_file)
        self.params, resolved = settings.policy_heads(policy, heads, groups)
        self.heads: dict[str, HeadSpec] = dict(heads)
        self.groups: dict[str, HeadSpec] = dict(groups or {})
        self._heads: list[Head] = resolved
        self._layers: list[Head] = settings.policy_layers(policy, layers, max_layers, self.params)
        self.const_labels = settings.const_labels(const_labels, self.catalog)
        self._errors = ErrorCounter()
        self._lock = threading.Lock()
        self._seeds = SeedRegistry(max_seeds, self._errors.record, self._republish_seeds)
        self.max_seeds = self._seeds.max_seeds
        self._meter = GradientMeter(self.params, resolved, self._layers)
        self._weights = WeightDelta(self.params, [*resolved, *self._layers]) if update_ratio else None
        policy_health = PolicyHealth(tuple(self.heads), action_sizes, self.catalog["policy_entropy"].history)
        self._fold = Fold(self.catalog, resolved, policy_health, self._errors.record, self._layers)
        self._snapshot = replace(empty_snapshot(tuple((h.name, h.kind) for h in resolved)), alert_scale=scale)
        self._update: Update | None = None
        self.enabled = settings.enabled(enabled)

        launch = launch_info()
        self.owns_registry = registry is None  # nothing but this Telemetry writes to it
        self.registry = registry if registry is not None else CollectorRegistry()
        self._collector = TeleCollector(self, world_size=launch.world_size, restarts=launch.restarts)
        if self.enabled:
            self.registry.register(self._collector)

    # -- the public API --------------------------------------------------------------

    def update(self) -> Update:
        """A context manager for one PPO update; the snapshot is published on exit."""
        return Update(
            meter=self._meter,
            params=self.params,
            heads=tuple(self.heads),
            on_enter=self._open,
            on_exit=self._close,
            record_error=self._errors.record,
            recording=self.enabled,
        )

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
            return SeedWatch(key, None, None)
        return self._seeds.watch(module, host, key, backward_gain)

    def finish(self) -> None:
        """Say that training ended cleanly: tele_run_finished becomes 1, so no absence alert pages for this run.

        Call it after the last update and before the server's close(), whose linger lets
        Prometheus scrape it; a run that crashes never calls it and still pages.
        """
        with self._lock:
            self._snapshot = replace(self._snapshot, finished=True)

    def snapshot(self) -> Snapshot:
        """The latest published snapshot (immutable)."""
        return self._snapshot

    def errors(self) -> dict[str, int]:
        """Exceptions caught inside telemetry, by site."""
        return self._errors.counts()

    def record_error(self, site: str, exc: BaseException) -> None:
        """Count a failure inside telemetry and log it the first time it happens at `site`."""
        self._errors.record(site, exc)

    def close(self) -> None:
        """Unregister from the registry and remove every seed's hooks."""
        self._seeds.close()
        with contextlib.suppress(KeyError):
            self.registry.unregister(self._collector)

    # -- internals -------------------------------------------------------------------

    def _republish_seeds(self) -> None:
        """Republish the seed list (new seeds show 0.0, no data; removed ones vanish) without an update."""
        with self._lock:
            old = {(s.env, s.slot): s for s in self._snapshot.seeds}
            seeds = tuple(old.get(key) or seed_state(self.catalog, key, NO_SEED_DATA) for key in self._seeds.live())
            self._snapshot = replace(self._snapshot, seeds=seeds, seeds_refused=self._seeds.refused)

    def _open(self, upd: Update) -> None:
        if self._update is not None:
            raise RuntimeError("a Telemetry update is already open; updates do not nest")
        self._update = upd
        if upd.recording and self._weights is not None:
            try:  # the update's "before": one fused device copy, at its start
                self._weights.take()
            except Exception as exc:
                self._errors.record("update_ratio", exc)

    def _close(self, upd: Update) -> None:
        self._update = None
        if not upd.recording:
            return
        try:
            self._publish(upd)
        except Exception as exc:
            self._errors.record("publish", exc)

    def _publish(self, upd: Update) -> None:
        gains, blocks = self._seeds.drain()
        weight_sums = None
        if self._weights is not None:
            try:
                weight_sums = self._weights.sums()
            except Exception as exc:  # the ratios are missing; the rest of the update still publishes
                self._errors.record("update_ratio", exc)
        recorded = Recorded(
            drained=self._meter.drain(),
            kls=upd.kls,
            clip_fractions=upd.clip_fractions,
            policy=upd.policy,
            gains=gains,
            host_blocks=blocks,
            stopped_early=upd.stopped_early,
            measure_calls=upd.measure_calls,
            weight_sums=weight_sums,
        )
        swap = self._fold.fold(recorded, self._seeds.live(), lambda: any(p.grad is not None for p in self.params))
        with self._lock:
            self._snapshot = swap(self._snapshot, self._seeds.live(), self._seeds.refused)
