"""The watched seeds of TELE-557: the registry of live watches, their handles, and their published states."""

from __future__ import annotations

import logging
import math
import numbers
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from torch import nn

from ..catalog import Catalog
from ..catalog.display import Shown, show
from ..measure.seed_probes import BackwardPass, HostPasses, HostProbe, SeedKey, SeedProbe
from ..snapshot import SeedState

log = logging.getLogger("tele_exporter")


class SeedWatch:
    """Handle of a watched seed; remove() (idempotent) drops its hooks and its series."""

    def __init__(
        self,
        key: SeedKey,
        probe: SeedProbe | None,
        host: HostProbe | None,
        on_remove: Callable[[SeedWatch], None] | None = None,
    ) -> None:
        self.env, self.slot = key
        self._probe = probe
        self.host = host
        self._on_remove = on_remove
        self._removed = False

    @property
    def key(self) -> SeedKey:
        return (self.env, self.slot)

    @property
    def active(self) -> bool:
        """False once removed, or when the watch was refused by the seed cap."""
        return self.host is not None and not self._removed

    def drain(self) -> list[BackwardPass]:
        """The backward-gain passes recorded since the last drain."""
        return self._probe.drain() if self._probe is not None else []

    def remove(self) -> None:
        if self.host is None or self._removed:
            return
        self._removed = True
        if self._probe is not None:
            self._probe.remove()
        if self._on_remove is not None:
            self._on_remove(self)

    def __enter__(self) -> SeedWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


class SeedRegistry:
    """Live seed watches and their host probes, capped at `max_seeds`; `on_change` republishes the seed list."""

    def __init__(
        self,
        max_seeds: int,
        record_error: Callable[[str, BaseException], None],
        on_change: Callable[[], None],
    ) -> None:
        # Any integer type (numpy's too) but bool: a count of seeds.
        count: object = max_seeds
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"max_seeds must be a whole number >= 0, got {max_seeds!r}")
        self.max_seeds = int(count)
        self._record_error = record_error
        self._on_change = on_change
        self._lock = threading.Lock()
        self._watches: dict[SeedKey, SeedWatch] = {}
        self._hosts: dict[int, HostProbe] = {}
        self.refused = 0

    def live(self) -> list[SeedKey]:
        """The live seeds, in the order they were watched."""
        with self._lock:
            return list(self._watches)

    @property
    def hosts(self) -> dict[int, HostProbe]:
        """The host probes with at least one live seed, by id of the host module."""
        return self._hosts

    def watch(self, module: nn.Module, host: nn.Module, key: SeedKey, backward_gain: bool) -> SeedWatch:
        """Probe a seed in `host`; past the cap the watch is refused and counted, and its handle is inert."""
        with self._lock:
            if key in self._watches:
                raise ValueError(f"a seed is already watched at env={key[0]!r} slot={key[1]!r}")
            refused = 0
            if len(self._watches) >= self.max_seeds:
                self.refused += 1
                refused = self.refused
        if refused:
            self._on_change()
            if refused == 1:
                log.warning("max_seeds=%d live seeds reached: further seeds are not watched", self.max_seeds)
            return SeedWatch(key, None, None)
        probe = self._hosts.get(id(host))
        if probe is None:
            probe = self._hosts[id(host)] = HostProbe(host, self._record_error)
        try:
            probe.add(key, module)
        except Exception:
            if probe.empty:
                del self._hosts[id(host)]
            raise
        gain = SeedProbe(module, self._record_error) if backward_gain else None
        watch = SeedWatch(key, gain, probe, self._drop)
        with self._lock:
            self._watches[key] = watch
        self._on_change()
        return watch

    def drain(self) -> tuple[dict[SeedKey, list[BackwardPass]], list[HostPasses]]:
        """Every live seed's backward-gain passes and every host's summed passes since the last drain."""
        with self._lock:
            watches = dict(self._watches)
        gains = {key: watch.drain() for key, watch in watches.items()}
        blocks = [block for probe in list(self._hosts.values()) for block in probe.drain()]
        return gains, blocks

    def close(self) -> None:
        """Remove every live watch's hooks."""
        for watch in list(self._watches.values()):
            watch.remove()

    def _drop(self, watch: SeedWatch) -> None:
        host = watch.host
        assert host is not None  # only an active watch calls back
        host.discard(watch.key)
        if host.empty and self._hosts.get(id(host.host)) is host:
            del self._hosts[id(host.host)]
        with self._lock:
            if self._watches.get(watch.key) is not watch:
                return
            del self._watches[watch.key]
        self._on_change()


@dataclass(frozen=True)
class SeedValues:
    """One seed's TELE-557 values of an update: mean ratio and passes with data, mean backward gain."""

    ratio: float
    passes: int
    backward_gain: float | None  # None: not measured (no probe, or no pass with data)


NO_SEED_DATA = SeedValues(0.0, 0, None)


def seed_state(catalog: Catalog, key: SeedKey, values: SeedValues) -> SeedState:
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
