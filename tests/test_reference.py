"""Every published number against the TELE formulas written independently in float64 numpy, read from a real scrape.

A trainer-shaped scenario runs multi-step PPO updates with missing heads, NaN and
Inf gradients, an early stop before the first step, clipped and unclipped steps,
KL observations and watched seeds (one pruned mid-run). The expected values come
from the gradients themselves with numpy float64 and the formulas as the TELE records and the README
states them; the actual values come from GET /metrics on a running server, parsed
by prometheus_client. Tolerance: 1e-6 relative where tele-exporter takes float32
per-tensor norms, float64 rounding for KL, exact for counts and presence.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from tele_exporter import Telemetry, serve
from tele_exporter.server.http import Server

HEADS = ("op", "slot", "blueprint")
MAX_NORM = 0.5
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(5, 7)
        self.op = nn.Linear(7, 4)
        self.slot = nn.Linear(7, 3)
        self.blueprint = nn.Linear(7, 2)


class Host(nn.Module):
    """A host layer with two seeds as alpha-blended parallel branches (submodules: excluded from the host)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 5)
        self.s1 = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 5))
        self.s2 = nn.Linear(6, 5)
        self.alpha = {"s1": 1.0, "s2": 1.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) + self.alpha["s1"] * self.s1(x) + self.alpha["s2"] * self.s2(x)
        out: torch.Tensor = self.b(torch.tanh(y))
        return out


# --- the TELE formulas in float64 numpy --------------------------------------------------------


def l2(arrays: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in arrays)))


def step_cv(norms: list[float | None]) -> float:
    values = np.array([v for v in norms if v is not None], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        return math.nan
    if values.size <= 1 or np.all(values == 0):
        return 0.0
    return float(np.std(values, ddof=1) / max(abs(float(np.mean(values))), 1e-8))


def approx_kl(log_ratio: np.ndarray, mask: np.ndarray) -> float:
    r = np.clip(log_ratio.astype(np.float64), -20.0, 20.0)
    kl_t = np.exp(r) - 1.0 - r
    n_valid = float(mask.sum())
    head = float((kl_t * mask).sum()) / max(n_valid, 1.0)
    w = n_valid / log_ratio.size
    return (w * head) / max(w, 1e-8)


def rms_ratio(seed: list[np.ndarray], host: list[np.ndarray]) -> float:
    g_s, g_h = l2(seed), l2(host)
    if g_s < 1e-8 or g_h < 1e-8:
        return 0.0
    n_s, n_h = sum(a.size for a in seed), sum(a.size for a in host)
    return (g_s / math.sqrt(n_s)) / (g_h / math.sqrt(n_h) + 1e-8)


@dataclass
class Expected:
    """What the exporter should publish, kept by the reference alone."""

    updates: int = 0
    early_stops: int = 0
    last_measured: dict[str, float] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HEADS, 0))
    nan: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HEADS, 0))  # steps with a NaN norm
    inf: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HEADS, 0))  # ... an Inf one
    first: dict[str, int] = field(default_factory=dict)  # the update's first non-finite step, its heads only
    state: dict[str, str] = field(default_factory=dict)  # each head's gradient state in the latest update
    head_clip: dict[str, float] = field(default_factory=dict)  # per-head clip fraction, mean over the calls
    log_prob: tuple[float, float] | None = None  # (min, max) over the update's valid log-probabilities
    head_steps: dict[str, list[float]] = field(default_factory=dict)  # every finite-or-not step value per head
    current: dict[str, float] = field(default_factory=dict)
    prev: dict[str, float] = field(default_factory=dict)
    pre: float | None = None
    post: float | None = None
    cv: float | None = None
    kl: float | None = None
    seeds: dict[str, tuple[float, int]] = field(default_factory=dict)


# --- the scenario -------------------------------------------------------------------------


class Scenario:
    """Drives Telemetry like a trainer and keeps the float64 reference of every step."""

    def __init__(self, tele: Telemetry, policy: Policy, host: Host) -> None:
        self.tele, self.policy, self.host = tele, policy, host
        self.rng = np.random.default_rng(11)
        self.exp = Expected()
        self.head_params = {h: list(getattr(policy, h).parameters()) for h in HEADS}
        self.watches = {
            name: tele.watch_seed(getattr(host, name), host=host, env="1", slot=name) for name in ("s1", "s2")
        }

    def _grads(self, missing: tuple[str, ...], poison: dict[str, float]) -> dict[int, np.ndarray]:
        """Random float32 gradients; heads in `missing` get none; `poison` puts NaN/Inf into a head."""
        grads: dict[int, np.ndarray] = {}
        for module_name in ("trunk", *HEADS):
            for p in getattr(self.policy, module_name).parameters():
                if module_name in missing:
                    p.grad = None
                    continue
                g = (self.rng.normal(0.0, self.rng.uniform(0.01, 2.0), size=tuple(p.shape))).astype(np.float32)
                if module_name in poison and p is self.head_params[module_name][0]:
                    g.flat[0] = poison[module_name]
                grads[id(p)] = g
                p.grad = torch.from_numpy(g.copy())
        return grads

    def update(
        self,
        steps: list[tuple[tuple[str, ...], dict[str, float], bool]],
        kls: int,
        early_stop: bool = False,
        seed_passes: int = 0,
    ) -> None:
        """One PPO update: each step is (missing heads, poison, clip?)."""
        e = self.exp
        rows: list[tuple[dict[str, float | None], float, float]] = []
        kl_values: list[float] = []
        ratios: dict[str, list[float]] = {k: [] for k in self.watches}
        with self.tele.update() as upd:
            for missing, poison, clip in steps:
                grads = self._grads(missing, poison)
                heads: dict[str, float | None] = {
                    h: None if h in missing else l2([grads[id(p)] for p in self.head_params[h]]) for h in HEADS
                }
                pre = l2(list(grads.values()))
                post = pre * min(1.0, MAX_NORM / (pre + 1e-6)) if clip else pre
                rows.append((heads, pre, post))
                if clip:
                    upd.clip_grad_norm_(MAX_NORM)
                else:
                    upd.observe_gradients()
            clips: list[float] = []
            log_probs: list[np.ndarray] = []
            for _ in range(kls):
                r = self.rng.normal(0.0, 0.2, size=32).astype(np.float32)
                m = self.rng.random(32) < 0.7
                kl_values.append(approx_kl(r, m))
                upd.observe_kl({"op": torch.from_numpy(r)}, {"op": torch.from_numpy(m)})
                upd.observe_ratios({"op": torch.from_numpy(r)}, {"op": torch.from_numpy(m)})
                own = np.exp(np.clip(r[m].astype(np.float64), -20.0, 20.0))  # the head's own ratio, its valid steps
                clips.append(float(np.count_nonzero(np.abs(own - 1.0) > 0.2)) / len(own))
                lp = -np.abs(self.rng.normal(0.0, 30.0, size=32)).astype(np.float32)
                upd.observe_log_probs({"op": torch.from_numpy(lp)}, {"op": torch.from_numpy(m)})
                log_probs.append(lp[m].astype(np.float64))
            for k in range(seed_passes):
                self.host.alpha["s2"] = 0.0 if k == 0 else 1.0  # s2 gets no gradient in the first pass: no data
                live = [name for name, w in self.watches.items() if w.active]
                x = torch.from_numpy(self.rng.normal(size=(8, 6)).astype(np.float32))
                self.host.zero_grad(set_to_none=True)
                self.host(x).pow(2).mean().backward()
                seed_ids = {id(p) for name in live for p in getattr(self.host, name).parameters()}
                host_grads = [
                    p.grad.numpy() for p in self.host.parameters() if id(p) not in seed_ids and p.grad is not None
                ]
                for name in live:
                    seed_grads = [p.grad.numpy() for p in getattr(self.host, name).parameters() if p.grad is not None]
                    seed_grads = seed_grads or [np.zeros(1)]
                    ratios[name].append(rms_ratio(seed_grads, host_grads))
            if early_stop:
                upd.early_stop()
        e.updates += 1
        e.early_stops += int(early_stop)
        e.head_clip = {"op": float(np.mean(clips))} if clips else {}
        every = np.concatenate(log_probs) if log_probs else np.zeros(0)
        e.log_prob = (float(every.min()), float(every.max())) if len(every) else None
        bad = {
            h: [i for i, row in enumerate(rows) if (v := row[0][h]) is not None and not math.isfinite(v)] for h in HEADS
        }
        earliest = min((steps_[0] for steps_ in bad.values() if steps_), default=None)
        e.first = {h: earliest for h, steps_ in bad.items() if steps_ and steps_[0] == earliest}
        for h in HEADS:
            values = [row[0][h] for row in rows if row[0][h] is not None]
            e.nonfinite[h] += sum(1 for v in values if not math.isfinite(v))  # type: ignore[arg-type]
            e.nan[h] += sum(1 for v in values if v is not None and math.isnan(v))
            e.inf[h] += sum(1 for v in values if v is not None and math.isinf(v))
            e.state[h] = "nonfinite" if bad[h] else ("finite" if values else "missing")
            e.prev[h] = e.last_measured.get(h, 0.0)
            e.current[h] = float(np.mean(values)) if values else math.nan
            if values:
                e.last_measured[h] = e.current[h]
        e.pre = float(np.mean([r[1] for r in rows])) if rows else None
        e.post = float(np.mean([r[2] for r in rows])) if rows else None
        e.cv = float(np.mean([step_cv(list(r[0].values())) for r in rows])) if rows else None
        e.kl = float(np.mean(kl_values)) if kl_values else None
        e.seeds = {}
        for name, w in self.watches.items():
            if w.active:
                with_data = [r for r in ratios[name] if r != 0.0]
                e.seeds[name] = (float(np.mean(with_data)) if with_data else 0.0, len(with_data))


# --- the checks ---------------------------------------------------------------------------


def scrape(server: Server) -> Samples:
    with urllib.request.urlopen(server.url, timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def close(actual: float, expected: float, rel: float) -> bool:
    if math.isnan(expected):
        return math.isnan(actual)
    if math.isinf(expected):
        return actual == expected
    return actual == pytest.approx(expected, rel=rel, abs=0)


def check(samples: Samples, e: Expected) -> None:
    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    assert value("tele_ppo_updates_total") == e.updates
    assert value("tele_ppo_early_stops_total") == e.early_stops
    for h in HEADS:
        got = value("tele_head_grad_norm", head=h, kind="action")
        assert got is not None and close(got, e.current[h], 1e-6), (h, got, e.current[h])
        prev = value("tele_head_grad_norm_prev", head=h, kind="action")
        assert prev is not None and close(prev, e.prev[h], 1e-6), (h, prev, e.prev[h])
        assert value("tele_nonfinite_gradients_total", head=h, kind="action", value="nan") == e.nan[h]
        assert value("tele_nonfinite_gradients_total", head=h, kind="action", value="inf") == e.inf[h]
        for state in ("finite", "missing", "nonfinite", "not_learnable"):
            want_state = float(state == e.state[h])
            assert value("tele_head_gradient_state", head=h, kind="action", state=state) == want_state, (h, state)
    first = {dict(labels)["head"]: v for (name, labels), v in samples.items() if name == "tele_nonfinite_first_step"}
    assert first == e.first, "the update's first non-finite step, on its head(s) only"
    head_clip = {dict(labels)["head"]: v for (name, labels), v in samples.items() if name == "tele_head_clip_fraction"}
    assert head_clip.keys() == e.head_clip.keys()
    for h, want_clip in e.head_clip.items():
        assert close(head_clip[h], want_clip, 1e-12), (h, head_clip[h], want_clip)
    extremes = (value("tele_log_prob_min"), value("tele_log_prob_max"))
    assert extremes == (e.log_prob or (None, None))
    for clip, want in (("pre", e.pre), ("post", e.post)):
        got = value("tele_policy_grad_norm", clip=clip)
        if want is None:
            assert got is None, f"no step measured: {clip} must be absent, got {got}"
        else:
            assert got is not None and close(got, want, 1e-6), (clip, got, want)
    cv = value("tele_gradient_cv")
    assert (cv is None) == (e.cv is None), (cv, e.cv)
    if cv is not None and e.cv is not None:
        assert close(cv, e.cv, 1e-6), (cv, e.cv)
    kl = value("tele_kl_divergence")
    assert (kl is None) == (e.kl is None), (kl, e.kl)
    if kl is not None and e.kl is not None:
        assert close(kl, e.kl, 1e-12), (kl, e.kl)
    published = {labels for name, labels in samples if name == "tele_seed_grad_ratio"}
    assert published == {(("env", "1"), ("slot", name)) for name in e.seeds}
    for name, (ratio, _) in e.seeds.items():
        got = value("tele_seed_grad_ratio", env="1", slot=name)
        assert got is not None and close(got, ratio, 1e-6), (name, got, ratio)
        exploding = not math.isfinite(ratio) or ratio > 2.0
        vanishing = 0.0 < ratio < 0.5
        assert value("tele_seed_gradient_exploding", env="1", slot=name) == float(exploding)
        assert value("tele_seed_gradient_vanishing", env="1", slot=name) == float(vanishing and not exploding)
    assert not any(name == "tele_telemetry_errors_total" for name, _ in samples)


@pytest.fixture
def scenario() -> Iterator[tuple[Scenario, Server]]:
    torch.manual_seed(0)
    policy, host = Policy(), Host()
    tele = Telemetry(policy, heads={h: getattr(policy, h) for h in HEADS})
    server = serve(tele, port=0)
    try:
        yield Scenario(tele, policy, host), server
    finally:
        server.close()
        tele.close()


def test_every_published_number_matches_the_float64_reference(scenario: tuple[Scenario, Server]) -> None:
    sc, server = scenario
    healthy: tuple[tuple[str, ...], dict[str, float], bool] = ((), {}, True)
    updates: list[dict[str, object]] = [
        {"steps": [healthy] * 3, "kls": 2, "seed_passes": 3},
        {"steps": [(("slot",), {}, True), ((), {"blueprint": math.nan}, False)], "kls": 0},
        {"steps": [], "kls": 1, "early_stop": True},  # early stop before the first step
        {"steps": [((), {"op": math.inf}, True), (("blueprint",), {}, True)], "kls": 1, "seed_passes": 2},
        {"steps": [((), {}, True), (("op", "slot", "blueprint"), {}, False)], "kls": 2, "seed_passes": 2},
        {"steps": [(("blueprint",), {}, True)] * 2, "kls": 1},
    ]
    for k, spec in enumerate(updates):
        if k == 4:
            sc.watches["s1"].remove()  # pruned between updates: its series go
        sc.update(**spec)  # type: ignore[arg-type]
        check(scrape(server), sc.exp)
    assert sc.exp.nonfinite == {"op": 1, "slot": 0, "blueprint": 1}
    assert (sc.exp.nan, sc.exp.inf) == ({"op": 0, "slot": 0, "blueprint": 1}, {"op": 1, "slot": 0, "blueprint": 0})


# --- sub-action heads and a critic outside the CV -------------------------------------------


class SlicedPolicy(nn.Module):
    """One linear layer for two sub-actions (rows 0-5 move, 6-7 fire), a whole-module head and a critic."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(5, 7)
        self.action_net = nn.Linear(7, 8)
        self.aim = nn.Linear(7, 3)
        self.critic = nn.Linear(7, 1)


SLICES = {"move": (0, 6), "fire": (6, 8)}


def sliced_reference(grads: dict[str, list[np.ndarray]], missing: tuple[str, ...]) -> dict[str, float | None]:
    """Per head from the modules' float64 gradients: a slice's norm is that of its weight rows and bias entries."""
    out: dict[str, float | None] = {}
    for name, (start, stop) in SLICES.items():
        out[name] = None if "action_net" in missing else l2([g[start:stop] for g in grads["action_net"]])
    for name in ("aim", "critic"):
        out[name] = None if name in missing else l2(grads[name])
    return out


def sliced_update(
    tele: Telemetry, policy: SlicedPolicy, rng: np.random.Generator, steps: list[tuple[tuple[str, ...], float, bool]]
) -> tuple[list[dict[str, float | None]], list[float]]:
    """One update of (modules without gradient, poison of fire's last weight row and the critic, clip?) steps."""
    rows: list[dict[str, float | None]] = []
    totals: list[float] = []
    with tele.update() as upd:
        for missing, poison, clip in steps:
            grads: dict[str, list[np.ndarray]] = {}
            for name in ("trunk", "action_net", "aim", "critic"):
                module = getattr(policy, name)
                if name in missing:
                    for p in module.parameters():
                        p.grad = None
                    continue
                scale = 30.0 if name == "critic" else rng.uniform(0.05, 1.0)
                arrays = [rng.normal(0.0, scale, size=tuple(p.shape)).astype(np.float32) for p in module.parameters()]
                if name in ("action_net", "critic"):
                    arrays[0][-1, 0] = arrays[0][-1, 0] if poison == 0.0 else poison
                grads[name] = arrays
                for p, g in zip(module.parameters(), arrays, strict=True):
                    p.grad = torch.from_numpy(g.copy())
            rows.append(sliced_reference(grads, missing))
            totals.append(l2([g for arrays in grads.values() for g in arrays]))
            if clip:
                upd.clip_grad_norm_(MAX_NORM)
            else:
                upd.observe_gradients()
    return rows, totals


def test_sliced_heads_and_a_critic_group_match_the_float64_reference() -> None:
    """Sub-action norms, and the CV over action heads only: a critic 30x larger, or NaN, stays out of it."""
    torch.manual_seed(0)
    policy = SlicedPolicy()
    tele = Telemetry(
        policy,
        heads={
            "move": (policy.action_net, slice(0, 6)),
            "fire": (policy.action_net, slice(6, None)),
            "aim": policy.aim,
        },
        groups={"critic": policy.critic},
    )
    server = serve(tele, port=0)
    rng = np.random.default_rng(5)
    updates: list[list[tuple[tuple[str, ...], float, bool]]] = [
        [((), 0.0, True), (("aim",), 0.0, True), (("action_net", "aim"), 0.0, True), ((), 0.0, False)],
        [(("action_net",), math.nan, True), ((), 0.0, False)],  # NaN in the critic only: the CV stays finite
        [((), math.inf, False), ((), 0.0, True)],  # Inf in fire's rows (and the critic's): fire and the CV are not
    ]
    try:
        nonfinite = dict.fromkeys(("move", "fire", "aim", "critic"), 0)
        for steps in updates:
            rows, totals = sliced_update(tele, policy, rng, steps)
            samples = scrape(server)
            for head, kind in (("move", "action"), ("fire", "action"), ("aim", "action"), ("critic", "other")):
                values = [v for r in rows if (v := r[head]) is not None]
                got = samples[("tele_head_grad_norm", (("head", head), ("kind", kind)))]
                assert close(got, float(np.mean(values)), 1e-6), (head, got, values)
                nonfinite[head] += sum(1 for v in values if not math.isfinite(v))
                published = sum(
                    samples[("tele_nonfinite_gradients_total", (("head", head), ("kind", kind), ("value", v)))]
                    for v in ("nan", "inf")
                )
                assert published == nonfinite[head]
            cvs = [step_cv([r[h] for h in ("move", "fire", "aim")]) for r in rows]
            assert close(samples[("tele_gradient_cv", ())], float(np.mean(cvs)), 1e-6), (cvs, samples)
            assert close(samples[("tele_policy_grad_norm", (("clip", "pre"),))], float(np.mean(totals)), 1e-6)
            assert not any(name == "tele_telemetry_errors_total" for name, _ in samples)
        assert nonfinite == {"move": 0, "fire": 1, "aim": 0, "critic": 2}
        assert tele.snapshot().gradient_cv is not None and math.isnan(tele.snapshot().gradient_cv)
    finally:
        server.close()
        tele.close()
