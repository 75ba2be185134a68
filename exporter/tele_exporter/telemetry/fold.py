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
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..catalog import Catalog
from ..measure.heads import ACTION, Head
from ..measure.meter import Drained
from ..measure.norms import SEED_NORM_FLOOR, stack_float64, step_cvs
from ..measure.seed_probes import BackwardPass, HostPasses, SeedKey
from ..snapshot import DEAD_LAYER_NORM, HeadState, LayerState, Snapshot, head_state
from .histograms import LabelledHistogram, bucket_columns
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

PassSums = tuple[tuple[SeedKey, ...], tuple[int, ...], Sequence[float]]  # a pass's seeds, parameter counts, sums


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
    weight_sums: Tensor | None = None  # [2, heads + layers]: squared weight norms at the update's start, of its change


@dataclass(frozen=True)
class OnHost:
    """What one update recorded, on the host after the one transfer; small values as Python floats."""

    rows: Tensor  # [steps, heads + 2] float64: per-head norms, pre- and post-clip totals
    kls: list[float]
    clip_fractions: list[float]
    gains: dict[SeedKey, list[float]]  # per seed: the backward gain of each pass with data
    host_passes: list[PassSums]  # each backward pass of a watched host, its sums on the host
    policy: Unpacked
    weights: list[float]  # weight_sums flattened: squared weight norms per group, then squared change norms


def to_host(recorded: Recorded) -> OnHost:
    """Pack everything the update recorded and copy it to the host, one transfer per device.

    The rows stay a tensor for the batched fold; everything else is read as Python
    floats with one tolist().
    """
    packer = Packer()
    drained = recorded.drained
    if drained is not None:
        packer.add("rows", drained.rows, values=False)
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
    if recorded.weight_sums is not None:
        packer.add("weights", recorded.weight_sums)
    host = packer.transfer()

    n_rows, width = tuple(drained.rows.shape) if drained is not None else (0, 0)
    gains: dict[SeedKey, list[float]] = {}
    for key, sides in gain_sides:
        norms = [v for piece in host.values(("gain", key)) for v in piece]
        by_side = [0.0] * (2 * ((max(sides) + 2) // 2) if sides else 0)
        for side, norm in zip(sides, norms, strict=True):
            by_side[side] += norm * norm
        # no output gradient: no data; a gain of 0 is data
        gains[key] = [_gain(by_side[i], by_side[i + 1]) for i in range(0, len(by_side), 2) if by_side[i + 1] != 0]
    passes: list[PassSums] = []
    for b, block in enumerate(recorded.host_blocks):
        per_device = host.values(("host", b))
        added = (
            [math.fsum(column) for column in zip(*per_device, strict=True)] if len(per_device) > 1 else per_device[0]
        )
        passes.extend(block.per_pass(added))
    return OnHost(
        host.cat("rows").reshape(n_rows, width),
        [v for piece in host.values("kl") for v in piece],
        [v for piece in host.values("clip_fraction") for v in piece],
        gains,
        passes,
        host,
        [v for piece in host.values("weights") for v in piece],
    )


def _gain(input_square: float, output_square: float) -> float:
    """A seed's backward gain |dL/d in| / |dL/d out| from the squared norms of one pass (NaN and Inf are data)."""
    return math.sqrt(input_square) / math.sqrt(output_square)


class Fold:
    """Turns each update's recordings into the next Snapshot; keeps what spans updates."""

    def __init__(
        self,
        catalog: Catalog,
        heads: Sequence[Head],
        policy: PolicyHealth,
        record_error: Callable[[str, BaseException], None],
        layers: Sequence[Head] = (),
    ) -> None:
        self.catalog = catalog
        self._heads = list(heads)
        self._layers = list(layers)  # measured after the heads: their columns follow the heads' in the rows
        self._by_name = {h.name: h for h in heads}
        self._actions = sum(h.kind == ACTION for h in heads)  # action heads come first
        self._policy = policy
        self._record_error = record_error
        self._grad_history: deque[float] = deque(maxlen=catalog["policy_grad_norm"].history)
        self._kl_history: deque[float] = deque(maxlen=catalog["kl_divergence"].history)
        self._nonfinite = {h.name: 0 for h in heads}
        self._nan = {h.name: 0 for h in heads}  # steps whose head norm was NaN, and +Inf: TELE-300/301 per head
        self._inf = {h.name: 0 for h in heads}
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

        One copy per device, then a fixed number of batched ops over the per-step rows
        (whatever the number of heads or steps) and two reads: the small values and the
        rows' results, each with one tolist(). The swap takes the latest snapshot, the
        seeds live at that moment and the refused count, and returns the next snapshot.
        `saw_gradients` tells whether any policy parameter holds a gradient (asked only
        when no step was measured, for a one-time hint).
        """
        host = to_host(recorded)
        policy_host = recorded.policy.unpack(host.policy)
        policy = self._policy.publish(policy_host)
        self.histograms["step_policy_entropy"].observe_values((), [t[0] for _, t in policy_host.entropies])
        rows = self._fold_rows(recorded.drained, host.rows)
        heads, steps = rows.heads, rows.steps
        if not recorded.measure_calls and not self._hinted_unmeasured and saw_gradients():
            self._hinted_unmeasured = True
            log.warning(_UNMEASURED_HINT)
        kls = self._checked_kls(host.kls)
        kl = _mean(kls)
        clip_fraction = _mean(host.clip_fractions)
        self.histograms["step_kl_divergence"].observe_values((), kls)
        self.histograms["step_clip_fraction"].observe_values((), host.clip_fractions)
        seed_values: dict[SeedKey, SeedValues] = {}
        all_ratios = seed_ratios(host.host_passes)
        for key in seeds:
            with_data = [r for r in all_ratios.get(key, []) if r != 0]
            self.histograms["step_seed_grad_ratio"].observe_values((), with_data)
            gain = host.gains.get(key, [])
            ratio = math.fsum(with_data) / len(with_data) if with_data else 0.0
            seed_values[key] = SeedValues(ratio, len(with_data), _mean(gain))
        pre, post, cv = rows.pre, rows.post, rows.cv
        ratios = self._update_ratios(host.weights)
        layers = tuple(
            LayerState(layer.name, *rows.layers[layer.name], ratios.get(("layer", layer.name)))
            for layer in self._layers
        )
        dead = sum(layer.dead for layer in layers) if layers and steps else None

        def swap(old: Snapshot, live: Sequence[SeedKey], refused: int) -> Snapshot:
            if pre is not None:  # TELE-311's history is pre-clip, as the records' system plots it since 8d0db0df
                self._grad_history.append(pre)
            if kl is not None:
                self._kl_history.append(kl)
            return Snapshot(
                updates=old.updates + 1,
                early_stops=old.early_stops + int(recorded.stopped_early),
                timestamp=time.time(),
                steps=steps,
                heads=tuple(
                    self._head_state(h, heads[h.name], ratios.get(("head", h.name)), rows.provenance.get(h.name))
                    for h in old.heads
                ),
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
                alert_scale=old.alert_scale,
                finished=False,  # a published update: the run is alive (again)
                layers=layers,
                dead_layers=dead,
            )

        return swap

    def _fold_rows(self, drained: Drained | None, rows: Tensor) -> FoldedRows:
        """Per-head means and counts, non-finite counts, totals, the CV and the histograms: one batch, one read.

        rows[s] = (head norms..., pre-clip, post-clip) of step s; a head counts at a step
        only where it had a gradient. A head with no step is (NaN, 0), never 0.0.
        """
        h, n = len(self._heads), rows.shape[0]
        g = h + len(self._layers)
        if not n or drained is None:
            return FoldedRows(
                {head.name: (math.nan, 0) for head in self._heads},
                0,
                None,
                None,
                None,
                {layer.name: (math.nan, 0, False) for layer in self._layers},
            )
        present_all = torch.tensor(drained.present, dtype=torch.bool).reshape(n, g)
        present, layer_present = present_all[:, :h], present_all[:, h:]
        values, layer_values = rows[:, :h], rows[:, h:g]
        counts = present.sum(0)
        means = torch.where(present, values, 0.0).sum(0) / counts  # 0 / 0: NaN for a head without a step
        bad = present & ~values.isfinite()
        nonfinite = bad.sum(0)
        nans = (present & values.isnan()).sum(0)  # the rest of `nonfinite` is +Inf (a norm is never -Inf)
        # Each head's first non-finite step (0-based measure call of the update); +Inf for a head without one.
        step_index = torch.tensor(drained.steps, dtype=torch.float64).reshape(n, 1)
        first = torch.where(bad, step_index, math.inf).amin(0)
        totals = rows[:, g:].mean(0)
        layer_parts = _layer_parts(layer_values, layer_present) if self._layers else []
        actions = self._actions  # TELE-330 compares action heads only; fewer than two: no CV at all
        cv = step_cvs(values[:, :actions], present[:, :actions]).mean().reshape(1)
        head_counts, head_sums = bucket_columns(values, present, self.histograms["step_head_grad_norm"].edges_tensor)
        clip = self.histograms["step_policy_grad_norm"]
        clip_counts, clip_sums = bucket_columns(rows[:, g:], torch.ones(n, 2, dtype=torch.bool), clip.edges_tensor)
        parts = [means, counts, nonfinite, nans, first, totals, cv, head_counts.reshape(-1), head_sums]
        flat = torch.cat(
            [
                *(p.to(torch.float64) for p in parts),
                clip_counts.reshape(-1),
                clip_sums,
                *(p.to(torch.float64) for p in layer_parts),
            ]
        ).tolist()
        out = iter(flat)
        mean_l, count_l, nonfinite_l, nan_l, first_l = ([next(out) for _ in range(h)] for _ in range(5))
        pre, post, cv_value = next(out), next(out), next(out)
        width = len(self.histograms["step_head_grad_norm"].edges) + 1
        head_buckets = [[int(next(out)) for _ in range(width)] for _ in range(h)]
        head_totals = [next(out) for _ in range(h)]
        clip_width = len(clip.edges) + 1
        clip_buckets = [[int(next(out)) for _ in range(clip_width)] for _ in range(2)]
        clip_totals = [next(out), next(out)]
        layer_mean_l, layer_count_l, layer_dead_l = ([next(out) for _ in self._layers] for _ in range(3))
        values_by_head: dict[str, tuple[float, int]] = {}
        earliest = min(first_l)  # the update's first non-finite step, +Inf when every norm was finite
        provenance: dict[str, Provenance] = {}
        for i, head in enumerate(self._heads):
            steps = int(count_l[i])
            values_by_head[head.name] = (mean_l[i], steps) if steps else (math.nan, 0)
            if steps:
                self._nonfinite[head.name] += int(nonfinite_l[i])
                self._nan[head.name] += int(nan_l[i])
                self._inf[head.name] += int(nonfinite_l[i]) - int(nan_l[i])
                self.histograms["step_head_grad_norm"].add((head.name, head.kind), head_buckets[i], head_totals[i])
            first_step = int(first_l[i]) if math.isfinite(first_l[i]) and first_l[i] == earliest else None
            provenance[head.name] = Provenance(int(nonfinite_l[i]) > 0, first_step)
        for i, side in enumerate(("pre", "post")):
            clip.add((side,), clip_buckets[i], clip_totals[i])
        values_by_layer = {
            layer.name: (layer_mean_l[i], int(layer_count_l[i]), bool(layer_dead_l[i]))
            if layer_count_l[i]
            else (math.nan, 0, False)
            for i, layer in enumerate(self._layers)
        }
        return FoldedRows(values_by_head, n, pre, post, cv_value if actions >= 2 else None, values_by_layer, provenance)

    def _update_ratios(self, weights: list[float]) -> dict[tuple[str, str], float]:
        """|theta_after - theta_before| / |theta_before| per ("head" | "layer", name), from the squared sums.

        A group whose weights were all zero at the update's start has no ratio (left out,
        missing: 0/0 or x/0 is no measurement); NaN and Inf weights are data and give NaN.
        """
        groups = [("head", head.name) for head in self._heads] + [("layer", layer.name) for layer in self._layers]
        if len(weights) != 2 * len(groups):
            return {}
        out: dict[tuple[str, str], float] = {}
        for i, key in enumerate(groups):
            before, delta = weights[i], weights[len(groups) + i]
            if before == 0.0:
                continue
            out[key] = math.sqrt(delta) / math.sqrt(before) if math.isfinite(before) else math.nan
        return out

    def _checked_kls(self, kls: list[float]) -> list[float]:
        """The update's KL values on the host; rounding negatives become 0.0, a real negative refuses them all.

        A value below -KL_ROUNDOFF cannot come from the expected non-negative
        estimator: the update's KL is missing, counted at site `negative_kl`, logged once.
        """
        negative = [k for k in kls if k < -KL_ROUNDOFF]
        if negative:
            self._record_error(
                "negative_kl",
                ValueError(
                    f"{len(negative)} of this update's {len(kls)} KL values are negative "
                    f"(min {min(negative):.3g}); observe_kl_value expects the non-negative estimator "
                    "mean(exp(r) - 1 - r) with r = new_logp - old_logp (CleanRL's and SB3's approx_kl), "
                    "not a signed one such as mean(old_logp - new_logp); this update's KL is missing"
                ),
            )
            return []
        return [k if k != k else max(k, 0.0) for k in kls]  # NaN stays NaN (max would drop it)

    def _head_state(
        self, old: HeadState, measured: tuple[float, int], update_ratio: float | None, provenance: Provenance | None
    ) -> HeadState:
        """TELE-320/321 after this update: prev is the latest earlier measured value, never a missing one.

        With the head's update ratio, its NaN and Inf step counts, its gradient state in this update
        and, for the head(s) non-finite at the update's first non-finite step, that step.
        """
        current, steps = measured
        prev = self._last_measured.get(old.name, 0.0)
        if steps:
            self._last_measured[old.name] = current
        nonfinite = provenance is not None and provenance.nonfinite
        if steps:
            state = "nonfinite" if nonfinite else "finite"
        else:  # no gradient in any step: frozen (no parameter requires grad) or simply without one
            learnable = any(p.requires_grad for p in self._by_name[old.name].params)
            state = "missing" if learnable else "not_learnable"
        return head_state(
            self.catalog,
            old.name,
            current,
            prev,
            self._nonfinite[old.name],
            steps,
            old.kind,
            update_ratio,
            nan_total=self._nan[old.name],
            inf_total=self._inf[old.name],
            state=state,
            first_nonfinite_step=provenance.first_step if provenance is not None else None,
        )


def _layer_parts(values: Tensor, present: Tensor) -> list[Tensor]:
    """Per layer: the mean over the steps with a gradient (as per head), those steps, and TELE-331's dead flag.

    Dead: a gradient at some step, and below DEAD_LAYER_NORM at every step that had one (NaN is data: never dead).
    """
    counts = present.sum(0)
    means = torch.where(present, values, 0.0).sum(0) / counts
    below = (values < DEAD_LAYER_NORM) | ~present
    return [means, counts, below.all(0) & (counts > 0)]


def seed_ratios(passes: list[PassSums]) -> dict[SeedKey, list[float]]:
    """TELE-557 ratio of every seed at each recorded backward pass that covered it (0.0: no data)."""
    out: dict[SeedKey, list[float]] = {}
    for seeds, numels, squares in passes:
        for col, key in enumerate(seeds, start=1):
            out.setdefault(key, []).append(rms_ratio(squares[col], numels[col], squares[0], numels[0]))
    return out


def rms_ratio(seed_square: float, seed_numel: int, host_square: float, host_numel: int) -> float:
    """TELE-557 on host floats: (|g_s|/sqrt(n_s)) / (|g_h|/sqrt(n_h) + 1e-8); 0.0 (no data) below 1e-8.

    The same formula as stats.seed_rms_ratio, for one pass; NaN and Inf norms propagate.
    """
    s_norm, h_norm = math.sqrt(seed_square), math.sqrt(host_square)
    if s_norm < SEED_NORM_FLOOR or h_norm < SEED_NORM_FLOOR:
        return 0.0
    return (s_norm / math.sqrt(max(seed_numel, 1))) / (h_norm / math.sqrt(max(host_numel, 1)) + SEED_NORM_FLOOR)


def _mean(values: Sequence[float]) -> float | None:
    """The mean of host floats (NaN and Inf propagate); None for none."""
    return math.fsum(values) / len(values) if values else None


@dataclass(frozen=True)
class Provenance:
    """Where an update's gradients went non-finite, for one head: whether they did, and the step if it was the first."""

    nonfinite: bool
    first_step: int | None  # the update's first non-finite step (0-based), if this head was non-finite there


@dataclass(frozen=True)
class FoldedRows:
    """The per-step rows of an update, folded: per head (mean, steps), steps, and the totals' means."""

    heads: dict[str, tuple[float, int]]
    steps: int
    pre: float | None
    post: float | None
    cv: float | None
    layers: dict[str, tuple[float, int, bool]]  # per layer: (mean norm, steps with a gradient, dead)
    provenance: dict[str, Provenance] = field(default_factory=dict)  # per head; empty when no step was measured


def _sides(record: BackwardPass) -> tuple[list[Tensor], list[Tensor]]:
    return record.input_norms, record.output_norms
