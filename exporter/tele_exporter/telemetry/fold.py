"""The fold: what one PPO update recorded on the device, copied to the host once, turned into a Snapshot.

`Fold` keeps what outlives an update (histograms, the 10-deep histories, each head's
last measured value and non-finite count, the entropy history) and, per update, packs
every producer's tensors into one transfer and reads the values back on the host.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..catalog import Catalog
from ..measure.heads import ACTION, Head
from ..measure.meter import Drained
from ..measure.norms import backward_gain, seed_rms_ratio, stack_float64, step_cvs
from ..measure.seed_probes import BackwardPass, HostPasses, SeedKey
from ..snapshot import HeadState, Snapshot, head_state
from .histograms import LabelledHistogram
from .packer import Packer, Unpacked
from .policy_record import PolicyHealth, PolicyRecorder
from .seeds import NO_SEED_DATA, SeedValues, seed_state

log = logging.getLogger("tele_exporter")

STEP_HISTOGRAMS = (
    "step_head_grad_norm",
    "step_policy_grad_norm",
    "step_kl_divergence",
    "step_seed_grad_ratio",
    "step_policy_entropy",
    "step_clip_fraction",
)

KL_ROUNDOFF = 1e-6
"""Negative KL values down to -KL_ROUNDOFF are float32 rounding of a non-negative estimator, taken as 0.0."""

_UNMEASURED_HINT = (
    "a Telemetry update saw gradients but measured no optimizer step, so gradient norms are missing: "
    "clip with upd.clip_grad_norm_(max_norm) instead of torch.nn.utils.clip_grad_norm_, "
    "or call upd.observe_gradients() before optimizer.step()"
)

PassSums = tuple[tuple[SeedKey, ...], tuple[int, ...], Tensor]  # a pass's seeds, parameter counts and float64 sums


@dataclass(frozen=True)
class Recorded:
    """What one update recorded on the training thread, still on the device."""

    drained: Drained | None  # the gradient meter's rows
    kls: Sequence[Tensor]
    clip_fractions: Sequence[Tensor]
    policy: PolicyRecorder
    gains: Mapping[SeedKey, list[BackwardPass]]  # backward-gain passes per seed
    host_blocks: Sequence[HostPasses]  # summed passes of every watched host
    stopped_early: bool
    measure_calls: int


@dataclass(frozen=True)
class OnHost:
    """What one update recorded, on the host after the one transfer."""

    rows: Tensor
    kls: Tensor
    clip_fractions: Tensor
    gains: dict[SeedKey, Tensor]
    host_passes: list[PassSums]  # each backward pass of a watched host, its sums on the host
    policy: Unpacked


def to_host(recorded: Recorded) -> OnHost:
    """Pack everything the update recorded and copy it to the host, one transfer per device."""
    packer = Packer()
    drained = recorded.drained
    if drained is not None:
        packer.add("rows", drained.rows)
    for k in recorded.kls:
        packer.add("kl", k)
    for c in recorded.clip_fractions:
        packer.add("clip_fraction", c)
    gain_sides: list[tuple[SeedKey, list[int]]] = []  # per seed: per norm, 2 * pass (input) or 2 * pass + 1 (output)
    for key, seed_passes in recorded.gains.items():
        complete = [p for p in seed_passes if p.input_norms and p.output_norms]
        sides = [2 * i + side for i, p in enumerate(complete) for side, ns in enumerate(_sides(p)) for _ in ns]
        gain_sides.append((key, sides))
        if complete:
            packer.add(("gain", key), stack_float64([n for p in complete for ns in _sides(p) for n in ns]))
    for b, block in enumerate(recorded.host_blocks):
        for sums in block.squares:  # one vector per device the host's gradients were on
            packer.add(("host", b), sums)
    recorded.policy.pack(packer)
    host = packer.transfer()

    n_rows, width = tuple(drained.rows.shape) if drained is not None else (0, 0)
    gains: dict[SeedKey, Tensor] = {}
    for key, sides in gain_sides:
        squares = host.cat(("gain", key)).square()
        n_passes = (max(sides) + 2) // 2 if sides else 0
        index = torch.tensor(sides, dtype=torch.long)
        sums = torch.zeros(2 * n_passes, dtype=torch.float64).index_add_(0, index, squares)
        g_in, g_out = sums[0::2].sqrt(), sums[1::2].sqrt()
        gains[key] = backward_gain(g_in, g_out)[g_out != 0]  # no output gradient: no data; a gain of 0 is data
    passes: list[PassSums] = []
    for b, block in enumerate(recorded.host_blocks):
        per_device = host.pieces(("host", b))
        passes.extend(block.per_pass(per_device[0] if len(per_device) == 1 else torch.stack(per_device).sum(0)))
    return OnHost(
        host.cat("rows").reshape(n_rows, width), host.cat("kl"), host.cat("clip_fraction"), gains, passes, host
    )


class Fold:
    """Turns each update's recordings into the next Snapshot; keeps what spans updates."""

    def __init__(
        self,
        catalog: Catalog,
        heads: Sequence[Head],
        policy: PolicyHealth,
        record_error: Callable[[str, BaseException], None],
    ) -> None:
        self.catalog = catalog
        self._heads = list(heads)
        self._actions = sum(h.kind == ACTION for h in heads)  # action heads come first
        self._policy = policy
        self._record_error = record_error
        self._grad_history: deque[float] = deque(maxlen=catalog["policy_grad_norm"].history)
        self._kl_history: deque[float] = deque(maxlen=catalog["kl_divergence"].history)
        self._nonfinite = {h.name: 0 for h in heads}
        self._last_measured: dict[str, float] = {}
        self._hinted_unmeasured = False
        self.histograms = {spec.id: LabelledHistogram(spec.buckets) for spec in catalog if spec.type == "histogram"}
        for required in STEP_HISTOGRAMS:  # a custom catalog without one is named, not a bare KeyError
            self.histograms.setdefault(required, LabelledHistogram(catalog[required].buckets))
        for head in heads:
            self.histograms["step_head_grad_norm"].ensure((head.name, head.kind))
        for clip in ("pre", "post"):
            self.histograms["step_policy_grad_norm"].ensure((clip,))
        for name in ("step_kl_divergence", "step_seed_grad_ratio", "step_policy_entropy", "step_clip_fraction"):
            self.histograms[name].ensure(())

    def fold(
        self, recorded: Recorded, seeds: Sequence[SeedKey], saw_gradients: Callable[[], bool]
    ) -> Callable[[Snapshot, Sequence[SeedKey], int], Snapshot]:
        """Read the update on the host; returns the swap, which the caller runs under its snapshot lock.

        The swap takes the latest snapshot, the seeds live at that moment and the refused
        count, and returns the next snapshot. `saw_gradients` tells whether any policy
        parameter holds a gradient (asked only when no step was measured, for a one-time hint).
        """
        host = to_host(recorded)
        policy_host = recorded.policy.unpack(host.policy)
        policy = self._policy.publish(policy_host)
        if policy_host.entropies:
            joint = torch.stack([t[0] for _, t in policy_host.entropies])
            self.histograms["step_policy_entropy"].observe_many((), joint)
        present = _present(recorded.drained, len(self._heads))
        heads, steps = self.head_values(present, host.rows)
        if not recorded.measure_calls and not self._hinted_unmeasured and saw_gradients():
            self._hinted_unmeasured = True
            log.warning(_UNMEASURED_HINT)
        pre = post = cv = None
        if steps:
            pre, post = float(host.rows[:, -2].mean()), float(host.rows[:, -1].mean())
            self.histograms["step_policy_grad_norm"].observe_many(("pre",), host.rows[:, -2])
            self.histograms["step_policy_grad_norm"].observe_many(("post",), host.rows[:, -1])
            actions = self._actions  # TELE-330 compares action heads only
            cv = float(step_cvs(host.rows[:, :actions], present[:, :actions]).mean())
        kls = self._checked_kls(host.kls)
        kl = float(kls.mean()) if kls.numel() else None
        clip_fraction = float(host.clip_fractions.mean()) if host.clip_fractions.numel() else None
        self.histograms["step_kl_divergence"].observe_many((), kls)
        self.histograms["step_clip_fraction"].observe_many((), host.clip_fractions)
        seed_values: dict[SeedKey, SeedValues] = {}
        all_ratios = seed_ratios(host.host_passes)
        for key in seeds:
            ratios = all_ratios.get(key, torch.zeros(0, dtype=torch.float64))
            with_data = ratios[ratios != 0]
            self.histograms["step_seed_grad_ratio"].observe_many((), with_data)
            gain = host.gains.get(key, torch.zeros(0, dtype=torch.float64))
            seed_values[key] = SeedValues(
                float(with_data.mean()) if with_data.numel() else 0.0,
                int(with_data.numel()),
                float(gain.mean()) if gain.numel() else None,
            )

        def swap(old: Snapshot, live: Sequence[SeedKey], refused: int) -> Snapshot:
            if post is not None:
                self._grad_history.append(post)
            if kl is not None:
                self._kl_history.append(kl)
            return Snapshot(
                updates=old.updates + 1,
                early_stops=old.early_stops + int(recorded.stopped_early),
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
                seeds=tuple(seed_state(self.catalog, key, seed_values.get(key, NO_SEED_DATA)) for key in live),
                histograms={hid: h.states() for hid, h in self.histograms.items()},
                seeds_refused=refused,
            )

        return swap

    def _checked_kls(self, kls: Tensor) -> Tensor:
        """The update's KL values on the host; rounding negatives become 0.0, a real negative refuses them all.

        A value below -KL_ROUNDOFF cannot come from the expected non-negative
        estimator: the update's KL is missing, counted at site `negative_kl`, logged once.
        """
        negative = kls < -KL_ROUNDOFF
        if bool(negative.any()):
            self._record_error(
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

    def head_values(self, present: Tensor, rows: Tensor) -> tuple[dict[str, tuple[float, int]], int]:
        """Per head: (mean over the steps where it had a gradient, how many); (NaN, 0) where it never did."""
        values = {head.name: (math.nan, 0) for head in self._heads}
        if not present.shape[0]:
            return values, 0
        hist = self.histograms["step_head_grad_norm"]
        for h, head in enumerate(self._heads):
            vals = rows[present[:, h], h]
            if vals.numel():
                values[head.name] = (float(vals.mean()), int(vals.numel()))
                self._nonfinite[head.name] += int((~torch.isfinite(vals)).sum())
                hist.observe_many((head.name, head.kind), vals)
        return values, int(present.shape[0])


def _present(drained: Drained | None, heads: int) -> Tensor:
    """[steps, heads] bool: which head had a gradient at which recorded step."""
    if drained is None:
        return torch.zeros(0, heads, dtype=torch.bool)
    return torch.tensor(drained.present, dtype=torch.bool).reshape(len(drained.present), heads)


def seed_ratios(passes: list[PassSums]) -> dict[SeedKey, Tensor]:
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
