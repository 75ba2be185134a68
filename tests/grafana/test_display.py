"""What a person sees in Grafana 12 is what the TELE records say, computed with Grafana's own code.

Real Prometheus scrapes (a) a static exporter whose series sit exactly on every catalog
boundary, one float below and one above, plus NaN, +Inf and 0, and (b) real demo runs, healthy
and with each `--fault`. Every panel query runs on it; tests/grafana/grafana_display.cjs turns
the responses into what each panel shows with npm @grafana/prometheus 12.4.0 and @grafana/data
12.4.2. The expected text and colour come from the catalog and `tele_exporter.catalog.display`, the
exporter's own reading of the records, never from the dashboard. Deliberately broken
dashboards (the old merge-on-__name__ tables, a threshold one float off, a mapping in the
wrong colour) must fail the same checks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tele_exporter.catalog import Catalog, MetricSpec, default_catalog, duration_seconds
from tele_exporter.catalog.display import head_trend, show
from tele_exporter.catalog.labels import GRADIENT_STATES
from tele_exporter.catalog.thresholds import apply, exported
from tele_exporter.generate import dashboards
from tests.support.demo import start_demo
from tests.support.grafana import by_title, grafana_display, grafana_escape, panel_responses
from tests.support.servers import Running, poll, prometheus_config, start_prometheus
from tests.support.static_exporter import StaticExporter, exposition

pytestmark = [pytest.mark.servers]

ROOT = Path(__file__).resolve().parents[2]
CATALOG = default_catalog()
ALL = {"job": "tele", "run": ".*", "instance": ".*", "env": ".*"}
KL, CV, HEADS, SEEDS, STALE = (
    "KL divergence",
    "Gradient CV status",
    "Action heads: gradient norm, trend and entropy",
    "Seeds: gradient flow per env and slot",
    "Time since the last PPO update",
)
HEAD_VALUES = [
    "Current",
    "Previous",
    "Trend",
    "Entropy",
    "Entropy level",
    "Norm level",
    "State",
    "First non-finite step",
]
HEAD_COLUMNS = ["Instance", "Head", "Kind", *HEAD_VALUES]
HEAD_ENTROPY = CATALOG["head_entropy"]
# Policy-health stats (TELE-120/121/124/130/140/200): panel title -> (catalog id, shown as label or number).
POLICY_STATS = {
    "Policy entropy": ("policy_entropy", False),
    "Entropy velocity": ("entropy_velocity", True),
    "Entropy collapsed": ("entropy_collapsed", True),
    "PPO clip fraction": ("clip_fraction", False),
    "Explained variance": ("explained_variance", False),
    "Advantage std": ("advantage_std", False),
    # TELE-160/161: the catalog's levels for every run (none starts above 0, so none moves).
    "Log-probability min": ("log_prob_min", False),
    "Log-probability max": ("log_prob_max", False),
}
SEED_VALUES = ["Gradient", "Ratio", "Backward gain", "Exploding", "Vanishing"]
SEED_COLUMNS = ["Instance", "Env", "Slot", *SEED_VALUES]
GAIN = CATALOG["seed_backward_gain"]
RANK = re.compile(r" rank (\d+)$")
START = re.compile(r" rank (\d+) ([a-z_]+)$")
# Runs with their own levels (Telemetry(thresholds=OWN)), served as ranks OWN_RANK and up;
# their seeds and heads are rank OWN_RANK's.
OWN = {
    "gradient_cv": {"warning": 1.0, "critical": 3.0},
    "kl_divergence": {"warning": 0.05, "critical": 0.1},
    "policy_grad_norm": {"healthy": 0.01, "warning": 50.0, "critical": 100.0},
    "clip_fraction": {"warning": 0.1, "critical": 0.2},
    "entropy_velocity": {"other_high": 0.02, "recovering": 0.05},
    "head_entropy": {"warning": 0.4, "healthy": 0.7},
    "seed_grad_ratio": {"healthy": 0.25, "exploding": 4.0},
}
OWN_CATALOG = apply(CATALOG, OWN)
OWN_RANK = 100
# Runs that export the catalog's starts as tele_threshold, as every run without overrides does, served
# as ranks EXPORTED_RANK and up with the same values as ranks 0 and up (which export none, as an
# older exporter would: the catalog fallback).
EXPORTED_RANK = 200
# A run whose KL was scraped only before the evaluation's range ended: its level at the end is
# unknown, so the per-run stat shows its last value once, in the catalog's colour.
GONE_RANK, GONE_KL = 300, 0.02
# Charts that draw each run's own level starts as dashed lines: title -> catalog id.
OWN_LINES = {
    "KL divergence over time": "kl_divergence",
    "Gradient CV over time": "gradient_cv",
    "Policy gradient norm, pre-clip": "policy_grad_norm",
    "Policy entropy over time": "policy_entropy",
}
LEVELS = "Levels per run"
LEVEL_COLUMNS = {"KL": "kl_divergence", "Gradient norm (pre-clip)": "policy_grad_norm", "Gradient CV": "gradient_cv"}
Shown = tuple[str, str | None]


def board() -> dict[str, Any]:
    return dict(json.loads((ROOT / dashboards.PATH).read_text(encoding="utf-8")))


def colour(status: str) -> str:
    return CATALOG.colour(status)


def number(value: float, decimals: int) -> str:
    """A number as the records print it; Grafana writes infinity as ∞ and a negative that rounds to 0 unsigned."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    text = f"{value:.{decimals}f}"
    return text.removeprefix("-") if float(text) == 0 else text


def levelled(spec: MetricSpec, value: float) -> Shown:
    """The number in its level's colour (NaN: "NaN", critical)."""
    return number(value, spec.precision), colour(show(spec, value).status)


def labelled(spec: MetricSpec, value: float) -> Shown:
    """The level's label in its colour, as display.show gives it."""
    shown = show(spec, value)
    return shown.label, colour(shown.status)


def probes(spec: MetricSpec) -> list[float]:
    """Every level boundary, one float below and above it (within the levels' domain), and NaN, +Inf, 0.

    A signed metric (levels from -inf: explained variance, entropy velocity) adds -Inf and negatives.
    """
    signed = spec.levels[0].when.low == -math.inf
    edges = {lv.when.low for lv in spec.levels if math.isfinite(lv.when.low)}
    edges |= {lv.when.high for lv in spec.levels if math.isfinite(lv.when.high)}
    values = {0.0, math.inf, *([-math.inf] if signed else [])}
    for edge in edges:
        values |= {math.nextafter(edge, -math.inf), edge, math.nextafter(edge, math.inf)}
    return [*sorted(v for v in values if signed or v >= 0), math.nan]


def seed_display(ratio: float, exploding: bool, vanishing: bool, catalog: Catalog = CATALOG) -> Shown:
    """TELE-557: exploding, then vanishing, then the ratio's own level (on the run's `catalog`)."""
    spec = catalog["seed_grad_ratio"]
    for flagged, name in ((exploding, "exploding"), (vanishing, "vanishing")):
        if flagged:
            level = spec.level(name)
            return level.label, colour(level.status)
    return labelled(spec, ratio)


def seed_flags(spec: MetricSpec, value: float) -> tuple[float, bool, bool]:
    """A seed as its run exports it: the ratio and its exploding/vanishing flags on the run's levels."""
    level = spec.level_of(value)
    flag = level.name if level is not None else ""
    return value, flag == "exploding", flag == "vanishing"


def flag_cell(flagged: bool, level: str) -> Shown:
    return ("1", colour(CATALOG["seed_grad_ratio"].level(level).status)) if flagged else ("0", colour("ok"))


def neutral(value: float, decimals: int) -> Shown:
    """A number with no levels: text colour, NaN critical as display.show has it."""
    return number(value, decimals), colour("critical") if math.isnan(value) else colour("neutral")


def trend_cell(current: float, prev: float) -> Shown:
    arrow = head_trend(CATALOG["head_grad_norm_prev"], current, prev)
    return (arrow.arrow, colour(arrow.status)) if arrow else ("no trend", colour("neutral"))


def compare(what: str, expected: dict[Any, Any], got: dict[Any, Any]) -> list[str]:
    """One line per key whose shown value differs from the expected one."""
    return [
        f"{what} {key}: shown {got.get(key)}, expected {want}" for key, want in expected.items() if got.get(key) != want
    ] + [f"{what} {key}: unexpected {got[key]}" for key in got if key not in expected]


def stat_by_rank(values: list[dict[str, Any]]) -> dict[int | str, Shown]:
    """Stat values by the rank their legend names (by the whole legend where it names none)."""
    out: dict[int | str, Shown] = {}
    for v in values:
        found = RANK.search(v["name"])
        key = int(found.group(1)) if found else v["name"]
        out[key] = ("shown more than once", None) if key in out else (v["text"], v["color"])
    return out


def table_rows(
    panel: dict[str, Any], columns: list[str], key: Callable[[dict[str, Shown]], Any]
) -> tuple[list[str], dict[Any, dict[str, Shown]]]:
    """Problems with the table's shape (columns, one row per key) and its rows by key."""
    table = panel["table"]
    problems = []
    if table["columns"] != columns:
        problems.append(f"{panel['title']}: columns {table['columns']}, expected {columns}")
    rows: dict[Any, dict[str, Shown]] = {}
    for row in table["rows"]:
        cells = {name: (c["text"], c["color"]) for name, c in zip(table["columns"], row, strict=True)}
        k = key(cells)
        if k in rows:
            problems.append(f"{panel['title']}: more than one row for {k}")
        rows[k] = cells
    return problems, rows


# ---------------------------------------------------------------- boundary series ----


@dataclass(frozen=True)
class Cases:
    """The boundary values served, by series index (rank, env or head number)."""

    kl: list[float]
    cv: list[float]
    grad: list[float]  # pre-clip
    # Values of runs (ranks OWN_RANK + i) that export OWN as their tele_threshold, by catalog id.
    own: dict[str, list[float]]
    seeds: list[tuple[float, bool, bool]]
    gains: list[float]
    heads: list[tuple[float, float]]
    stale: list[float]
    head_entropy: list[float]  # one per head, beside `heads`
    policy: dict[str, list[float]]  # POLICY_STATS' metric id -> its values, by rank


@dataclass(frozen=True)
class Boundary:
    """Prometheus holding the boundary `cases`; evaluate at `at`."""

    prom: Running
    at: float
    cases: Cases


def boundary_cases() -> Cases:
    ratio = CATALOG["seed_grad_ratio"]
    seeds = [seed_flags(ratio, value) for value in probes(ratio)]
    seeds.append((math.inf, False, False))  # a non-finite ratio is exploding even without its flag
    stale = next(a for a in CATALOG["last_update_timestamp"].alerts if a.kind == "stale")
    after = duration_seconds(stale.after or "0s")
    head_entropy = probes(HEAD_ENTROPY)
    heads = [(1.0, 1.0), (math.nan, 0.5), (math.inf, 1.0), (0.05, 0.5), (3.0, 1.0)]
    heads += [(1.0, 1.0)] * (len(head_entropy) - len(heads))
    return Cases(
        kl=probes(CATALOG["kl_divergence"]),
        cv=probes(CATALOG["gradient_cv"]),
        grad=probes(CATALOG["policy_grad_norm"]),
        own={sid: [*probes(OWN_CATALOG[sid]), *CATALOG[sid].thresholds()] for sid in OWN},
        seeds=seeds,
        gains=[*(0.25 * i for i in range(len(seeds) - 1)), math.nan],
        heads=heads,
        stale=[after - 1, after, after + 0.001, after + 1],
        head_entropy=head_entropy,
        policy={metric: probes(CATALOG[metric]) for metric, _ in POLICY_STATS.values()},
    )


def first_step(cases: Cases, i: int) -> float:
    """The first non-finite step the boundary's non-finite head i exports: its index, so each differs."""
    return float(i)


def head_labels(cases: Cases, i: int) -> dict[str, str]:
    """Head i's labels: the last head is a group outside the CV (kind="other"), the rest action heads."""
    return {"head": f"h{i}", "kind": "other" if i == len(cases.heads) - 1 else "action"}


def own_seeds(cases: Cases) -> list[tuple[float, bool, bool]]:
    """Rank OWN_RANK's seeds: the ratios of cases.own, flagged on its own levels as the run flags them."""
    return [seed_flags(OWN_CATALOG["seed_grad_ratio"], v) for v in cases.own["seed_grad_ratio"]]


def ranked(values: list[float], labels: dict[str, str] | None = None) -> list[tuple[dict[str, str], float]]:
    """One series per value, rank i and rank EXPORTED_RANK + i, with `labels`."""
    return [
        ({"rank": str(first + i), **(labels or {})}, v) for first in (0, EXPORTED_RANK) for i, v in enumerate(values)
    ]


def own_ranked(cases: Cases, metric: str, labels: dict[str, str] | None = None) -> list[tuple[dict[str, str], float]]:
    """cases.own[metric] (none if absent) as ranks OWN_RANK and up."""
    return [({"rank": str(OWN_RANK + i), **(labels or {})}, v) for i, v in enumerate(cases.own.get(metric, []))]


def boundary_text(cases: Cases, at: float) -> str:
    """The cases as /metrics text; update timestamps are ages before `at`."""
    c = CATALOG
    seed = [{"env": str(i), "slot": "s"} for i in range(len(cases.seeds))]
    own_seed = [{"rank": str(OWN_RANK), "env": f"own{i}", "slot": "s"} for i in range(len(own_seeds(cases)))]
    own_head = [
        {"rank": str(OWN_RANK), "head": f"own{i}", "kind": "action"} for i in range(len(cases.own["head_entropy"]))
    ]
    return exposition(
        {
            c["kl_divergence"].name: ranked(cases.kl) + own_ranked(cases, "kl_divergence"),
            c["gradient_cv"].name: ranked(cases.cv) + own_ranked(cases, "gradient_cv"),
            c["policy_grad_norm"].name: ranked(cases.grad, {"clip": "pre"})
            + own_ranked(cases, "policy_grad_norm", {"clip": "pre"}),
            c["threshold"].name: [
                ({"rank": str(first + i), "metric": name, "level": level}, start)
                for first, catalog, values in (
                    (OWN_RANK, OWN_CATALOG, cases.own.values()),
                    (EXPORTED_RANK, CATALOG, [cases.kl, cases.cv, cases.grad, *cases.policy.values()]),
                )
                for i in range(max(len(v) for v in values))
                for name, level, start in exported(catalog)
            ],
            c["seed_grad_ratio"].name: [(seed[i], v) for i, (v, _, _) in enumerate(cases.seeds)]
            + [(own_seed[i], v) for i, (v, _, _) in enumerate(own_seeds(cases))],
            c["seed_gradient_exploding"].name: [(seed[i], float(e)) for i, (_, e, _) in enumerate(cases.seeds)]
            + [(own_seed[i], float(e)) for i, (_, e, _) in enumerate(own_seeds(cases))],
            c["seed_gradient_vanishing"].name: [(seed[i], float(v)) for i, (_, _, v) in enumerate(cases.seeds)]
            + [(own_seed[i], float(v)) for i, (_, _, v) in enumerate(own_seeds(cases))],
            GAIN.name: [(seed[i], g) for i, g in enumerate(cases.gains)] + [(labels, 1.0) for labels in own_seed],
            c["head_grad_norm"].name: [(head_labels(cases, i), cur) for i, (cur, _) in enumerate(cases.heads)]
            + [(labels, 1.0) for labels in own_head],
            c["head_grad_norm_prev"].name: [(head_labels(cases, i), prev) for i, (_, prev) in enumerate(cases.heads)]
            + [(labels, 1.0) for labels in own_head],
            c["head_gradient_state"].name: [
                ({**labels, "state": state}, 1.0 if state == head_state(cur) else 0.0)
                for labels, cur in [
                    *((head_labels(cases, i), cur) for i, (cur, _) in enumerate(cases.heads)),
                    *((labels, 1.0) for labels in own_head),
                ]
                for state in GRADIENT_STATES
            ],
            c["nonfinite_first_step"].name: [
                (head_labels(cases, i), first_step(cases, i))
                for i, (cur, _) in enumerate(cases.heads)
                if not math.isfinite(cur)
            ],
            c["last_update_timestamp"].name: [({"rank": str(i)}, at - age) for i, age in enumerate(cases.stale)],
            HEAD_ENTROPY.name: [({"head": f"h{i}"}, v) for i, v in enumerate(cases.head_entropy)]
            + [
                ({"rank": str(OWN_RANK), "head": labels["head"]}, v)
                for labels, v in zip(own_head, cases.own["head_entropy"], strict=True)
            ],
            **{c[metric].name: ranked(values) + own_ranked(cases, metric) for metric, values in cases.policy.items()},
        }
    )


@pytest.fixture(scope="module")
def boundary() -> Iterator[Boundary]:
    """Prometheus that scraped the boundary series (served from 3 s before `at` on; GONE_RANK's before that)."""
    cases = boundary_cases()
    name = CATALOG["kl_divergence"].name
    with StaticExporter() as exporter, start_prometheus(prometheus_config([exporter.address])) as prom:
        exporter.text = exposition({name: [({"rank": str(GONE_RANK)}, GONE_KL)]})
        poll(lambda: prom.query(name), timeout=60, interval=0.5, what="the first scrape")
        at = float(math.floor(time.time()) + 3)
        exporter.text = boundary_text(cases, at)

        def scraped() -> bool:
            if time.time() < at + 1.5:
                return False
            body = prom.api("/api/v1/query", query=f"count({name})", time=f"{at:.3f}")
            return bool(body["data"]["result"])

        poll(scraped, timeout=60, interval=0.5, what="boundary series scraped before the evaluation time")
        yield Boundary(prom, at, cases)


def levels_problems(run: Boundary, dashboard: dict[str, Any], shown: dict[str, Any]) -> list[str]:
    """The levels table: each run's level on its own thresholds (the catalog's for ranks below OWN_RANK)."""
    catalog_values = {"kl_divergence": run.cases.kl, "gradient_cv": run.cases.cv, "policy_grad_norm": run.cases.grad}
    expected: dict[str, dict[str, Shown]] = {}
    for column, sid in LEVEL_COLUMNS.items():
        for offset, values, catalog in (
            (0, catalog_values[sid], CATALOG),
            (EXPORTED_RANK, catalog_values[sid], CATALOG),
            (OWN_RANK, run.cases.own[sid], OWN_CATALOG),
        ):
            for i, value in enumerate(values):
                expected.setdefault(str(offset + i), {})[column] = labelled(catalog[sid], value)
    shape, rows = table_rows(
        by_title(dashboard, shown, LEVELS), ["Instance", "Rank", *LEVEL_COLUMNS], lambda c: c["Rank"][0]
    )
    got = {rank: {col: cells[col] for col in expected.get(rank, {})} for rank, cells in rows.items()}
    return shape + compare(LEVELS, expected, got)


def ranked_columns(columns: list[str]) -> list[str]:
    """A table's columns when some of its series carry a rank (the boundary's own-level run does)."""
    return [columns[0], "Rank", *columns[1:]]


def head_state(current: float) -> str:
    """The gradient state a run exports with a head's norm: nonfinite for NaN or Inf, else finite."""
    return "finite" if math.isfinite(current) else "nonfinite"


def head_cells(
    current: float, prev: float, entropy: float, catalog: Catalog, first: float | None = None, state: str | None = None
) -> dict[str, Shown]:
    """A head's row: plain norms, the trend arrow, the entropy plain and its level on the run's `catalog`, TELE-320's
    level of the norm, the head's gradient state, and the update's first non-finite step where the head has one."""
    state = state or head_state(current)
    cells = {
        "Current": neutral(current, 3),
        "Previous": neutral(prev, 3),
        "Trend": trend_cell(current, prev),
        "Entropy": neutral(entropy, HEAD_ENTROPY.precision),
        "Entropy level": labelled(catalog["head_entropy"], entropy),
        "Norm level": labelled(catalog["head_grad_norm"], current),
        "State": (state, colour({"finite": "ok", "nonfinite": "critical"}.get(state, "neutral"))),
    }
    if first is not None:
        cells["First non-finite step"] = neutral(first, 0)
    return cells


def own_start_problems(run: Boundary, dashboard: dict[str, Any], shown: dict[str, Any]) -> list[str]:
    """The charts' dashed lines: each own-level run's starts that differ from the catalog's, in the level's colour."""
    problems = []
    for title, metric in OWN_LINES.items():
        spec, own = CATALOG[metric], OWN_CATALOG[metric]
        moved = {
            level.name: level.when.low
            for level, mine in zip(spec.levels, own.levels, strict=True)
            if level.name in OWN.get(metric, {}) and mine.when.low != level.when.low
        }
        runs = max(len(values) for values in run.cases.own.values())
        expected = {
            (OWN_RANK + i, name): (number(OWN[metric][name], spec.precision), colour(spec.level(name).status))
            for i in range(runs)
            for name in moved
        }
        got: dict[tuple[int, str], Shown] = {}
        for v in by_title(dashboard, shown, title)["values"]:
            found = START.search(v["name"])
            if found:
                got[(int(found.group(1)), found.group(2))] = (v["text"], v["color"])
        problems += compare(f"{title} own starts", expected, got)
    return problems


def boundary_problems(run: Boundary, dashboard: dict[str, Any], keep_name: bool = False) -> list[str]:
    """Every difference between what Grafana shows for the boundary series and the records."""
    shown = grafana_display(dashboard, panel_responses(run.prom, dashboard, run.at, ALL, 60), keep_name)
    problems = levels_problems(run, dashboard, shown)
    stats = {
        KL: ("kl_divergence", levelled, run.cases.kl),
        "Gradient CV": ("gradient_cv", levelled, run.cases.cv),
        CV: ("gradient_cv", labelled, run.cases.cv),
        **{
            title: (metric, labelled if as_label else levelled, run.cases.policy[metric])
            for title, (metric, as_label) in POLICY_STATS.items()
        },
    }
    for title, (metric, show_as, values) in stats.items():
        # Every run in its own levels: OWN's for ranks OWN_RANK and up, the catalog's for the rest.
        own = run.cases.own.get(metric, [])
        expected = {
            first + i: show_as(CATALOG[metric], v) for first in (0, EXPORTED_RANK) for i, v in enumerate(values)
        }
        expected |= {OWN_RANK + i: show_as(OWN_CATALOG[metric], v) for i, v in enumerate(own)}
        if title == KL:
            expected[GONE_RANK] = levelled(CATALOG[metric], GONE_KL)
        problems += compare(title, expected, stat_by_rank(by_title(dashboard, shown, title)["values"]))
    problems += own_start_problems(run, dashboard, shown)

    shape, seeds = table_rows(by_title(dashboard, shown, SEEDS), ranked_columns(SEED_COLUMNS), lambda c: c["Env"][0])
    problems += shape
    expected_seeds = {}
    for key, cases, gains, catalog in (
        ("{}", run.cases.seeds, run.cases.gains, CATALOG),
        ("own{}", own_seeds(run.cases), [1.0] * len(own_seeds(run.cases)), OWN_CATALOG),
    ):
        for i, (value, exploding, vanishing) in enumerate(cases):
            expected_seeds[key.format(i)] = {
                "Gradient": seed_display(value, exploding, vanishing, catalog),
                "Ratio": neutral(value, catalog["seed_grad_ratio"].precision),
                "Backward gain": neutral(gains[i], GAIN.precision),
                "Exploding": flag_cell(exploding, "exploding"),
                "Vanishing": flag_cell(vanishing, "vanishing"),
            }
    got = {k: {c: row.get(c) for c in SEED_VALUES} for k, row in seeds.items()}
    problems += compare(SEEDS, expected_seeds, got)

    shape, heads = table_rows(by_title(dashboard, shown, HEADS), ranked_columns(HEAD_COLUMNS), lambda c: c["Head"][0])
    problems += shape
    want_heads = {
        f"h{i}": head_cells(
            c, p, run.cases.head_entropy[i], CATALOG, None if math.isfinite(c) else first_step(run.cases, i)
        )
        for i, (c, p) in enumerate(run.cases.heads)
    }
    want_heads |= {f"own{i}": head_cells(1.0, 1.0, v, OWN_CATALOG) for i, v in enumerate(run.cases.own["head_entropy"])}
    got_heads = {k: {c: row.get(c) for c in want_heads.get(k, HEAD_VALUES)} for k, row in heads.items()}
    problems += compare(HEADS, want_heads, got_heads)
    kinds = {f"h{i}": head_labels(run.cases, i)["kind"] for i in range(len(run.cases.heads))}
    kinds |= dict.fromkeys((f"own{i}" for i in range(len(run.cases.own["head_entropy"]))), "action")
    problems += compare(HEADS, kinds, {k: row.get("Kind", ("",))[0] for k, row in heads.items()})

    stale = stat_by_rank(by_title(dashboard, shown, STALE)["values"])
    limit = run.cases.stale[1]
    problems += compare(
        STALE,
        {i: colour("ok" if age <= limit else "critical") for i, age in enumerate(run.cases.stale)},
        {i: c for i, (_, c) in stale.items()},
    )
    fresh = {stale.get(i, ("", None))[0] for i, age in enumerate(run.cases.stale) if age <= limit}
    old = {stale.get(i, ("", None))[0] for i, age in enumerate(run.cases.stale) if age > limit}
    if fresh & old:
        problems.append(f"{STALE}: {sorted(fresh & old)} shown on both sides of the threshold")
    return problems


def test_boundaries_show_as_the_records_say(boundary: Boundary) -> None:
    assert boundary_problems(boundary, board()) == []


def test_tables_hold_together_when_the_backend_keeps_names(boundary: Boundary) -> None:
    assert boundary_problems(boundary, board(), keep_name=True) == []


def test_nan_mapping_beats_a_fixed_colour(boundary: Boundary) -> None:
    """A NaN in a query painted a fixed colour still reads "NaN" in the critical colour: Grafana maps first."""
    painted = copy.deepcopy(board())
    (panel,) = [p for p in painted["panels"] if p["title"] == KL]
    ok = colour("ok")
    panel["fieldConfig"]["overrides"].append(
        {
            "matcher": {"id": "byFrameRefID", "options": dashboards.REST_REF},
            "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": ok}}],
        }
    )
    shown = grafana_display(painted, panel_responses(boundary.prom, painted, boundary.at, ALL, 60))
    stats = stat_by_rank(by_title(painted, shown, KL)["values"])
    nan = [first + i for first in (0, EXPORTED_RANK) for i, v in enumerate(boundary.cases.kl) if math.isnan(v)]
    assert nan and {stats[rank] for rank in nan} == {("NaN", colour("critical"))}
    assert stats[GONE_RANK] == (number(GONE_KL, CATALOG["kl_divergence"].precision), ok)  # the colour applies


def test_a_seed_without_gradient_data_reads_no_data_uncoloured_not_a_green_ok(boundary: Boundary) -> None:
    """TELE-557's ratio of 0 is no gradient data: Grafana says "no data" in the text colour, not a healthy "OK"."""
    dashboard = board()
    shown = grafana_display(dashboard, panel_responses(boundary.prom, dashboard, boundary.at, ALL, 60))
    _, seeds = table_rows(by_title(dashboard, shown, SEEDS), ranked_columns(SEED_COLUMNS), lambda c: c["Env"][0])
    empty = [str(i) for i, (value, _, _) in enumerate(boundary.cases.seeds) if value == 0.0]
    assert empty and {seeds[key]["Gradient"] for key in empty} == {("no data", colour("neutral"))}
    assert all(seeds[key]["Gradient"][1] != colour("ok") for key in empty)


def _old_tables(dashboard: dict[str, Any]) -> None:
    """The tables as they were: plain selectors merged with `__name__` still on them."""
    for panel in dashboard["panels"]:
        if panel["type"] != "table":
            continue
        for target in panel["targets"]:
            target["expr"] = re.sub(r"^max by \([^)]*\) \((.*)\)$", r"\1", target["expr"])
        panel["transformations"][1]["options"]["excludeByName"].pop("__name__")


def _boundary_off(title: str, metric: str, level: str) -> Callable[[dict[str, Any]], None]:
    """The catalog's start of `level` one float higher in the panel's level-code queries."""
    low = CATALOG[metric].level(level).when.low

    def mutate(dashboard: dict[str, Any]) -> None:
        (panel,) = [p for p in dashboard["panels"] if p["title"] == title]
        for target in panel["targets"]:
            target["expr"] = target["expr"].replace(f" bool {low!r})", f" bool {math.nextafter(low, math.inf)!r})")

    return mutate


def _cv_mapping_colour(dashboard: dict[str, Any]) -> None:
    (panel,) = [p for p in dashboard["panels"] if p["title"] == CV]
    panel["fieldConfig"]["defaults"]["mappings"][0]["options"]["1"]["color"] = "orange"


def _seed_mapping_colour(dashboard: dict[str, Any]) -> None:
    (panel,) = [p for p in dashboard["panels"] if p["title"] == SEEDS]
    exploding = CATALOG["seed_grad_ratio"].level("exploding").label
    for override in panel["fieldConfig"]["overrides"]:
        for prop in override["properties"]:
            if prop["id"] == "mappings":
                for mapping in prop["value"]:
                    for result in mapping["options"].values() if mapping["type"] == "value" else []:
                        if result.get("text") == exploding:
                            result["color"] = "orange"


def _catalog_levels_only(dashboard: dict[str, Any]) -> None:
    """Every query reads a series no run exports instead of tele_threshold: the catalog's levels for all."""
    threshold = CATALOG["threshold"].name
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            target["expr"] = target["expr"].replace(f"{threshold}{{", f"{threshold}_absent{{")


def _kl_warning_in_critical_colour(dashboard: dict[str, Any]) -> None:
    (panel,) = [p for p in dashboard["panels"] if p["title"] == KL]
    for override in panel["fieldConfig"]["overrides"]:
        if override["matcher"] == {"id": "byFrameRefID", "options": "warning"}:
            override["properties"][0]["value"]["fixedColor"] = colour("critical")


def _own_starts_for_every_run(dashboard: dict[str, Any]) -> None:
    """The charts draw every run's exported starts, the catalog's too."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            target["expr"] = re.sub(r" != [-+.e\d]+, \"", ', "', target["expr"])


def _velocity_mapping_colour(dashboard: dict[str, Any]) -> None:
    (panel,) = [p for p in dashboard["panels"] if p["title"] == "Entropy velocity"]
    panel["fieldConfig"]["defaults"]["mappings"][0]["options"]["0"]["color"] = "orange"


MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "head entropy level one float off": (_boundary_off(HEADS, "head_entropy", "warning"), HEADS),
    "entropy velocity [vv] mapping in the wrong colour": (_velocity_mapping_colour, "Entropy velocity"),
    "old merge-on-__name__ tables": (_old_tables, "more than one row"),
    "KL level one float off": (_boundary_off(KL, "kl_divergence", "warning"), KL),
    "CV warn mapping in the wrong colour": (_cv_mapping_colour, CV),
    "seed EXPLODING mapping in the wrong colour": (_seed_mapping_colour, SEEDS),
    "levels table on the catalog's levels for every run": (_catalog_levels_only, LEVELS),
    "CV status on the catalog's levels for every run": (_catalog_levels_only, CV),
    "KL stat on the catalog's levels for every run": (_catalog_levels_only, KL),
    "Gradient CV stat on the catalog's levels for every run": (_catalog_levels_only, "Gradient CV 10"),
    "clip fraction stat on the catalog's levels for every run": (_catalog_levels_only, "PPO clip fraction"),
    "entropy velocity on the catalog's levels for every run": (_catalog_levels_only, "Entropy velocity"),
    "seed gradient on the catalog's levels for every run": (_catalog_levels_only, SEEDS),
    "head entropy level on the catalog's levels for every run": (_catalog_levels_only, HEADS),
    "KL warning painted in the critical colour": (_kl_warning_in_critical_colour, KL),
    "own starts drawn for runs on the catalog's starts": (_own_starts_for_every_run, "KL divergence over time"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_broken_dashboard_fails(boundary: Boundary, name: str) -> None:
    mutate, caught_by = MUTATIONS[name]
    broken = copy.deepcopy(board())
    mutate(broken)
    problems = boundary_problems(boundary, broken)
    assert any(caught_by in line for line in problems), (name, problems)


# ---------------------------------------------------------------- real demo runs ----

FAULTS = ("none", "kl", "explode", "vanish", "nan")
MIN_UPDATES = 5


@dataclass(frozen=True)
class Live:
    """Prometheus that scraped one demo run per fault, side by side; `runs` maps fault -> its `run` label."""

    prom: Running
    at: float
    start: float
    instances: dict[str, str]
    runs: dict[str, str]


def run_name(fault: str) -> str:
    """The `run` label of the demo run with `fault`: what its legends and table rows must name."""
    return f"demo-{fault}"


def labelled_config(targets: dict[str, str]) -> str:
    """A prometheus.yml (tests.support's) whose targets each carry a `run` label, as file_sd targets can."""
    config = yaml.safe_load(prometheus_config(list(targets.values())))
    config["scrape_configs"][0]["static_configs"] = [
        {"targets": [address], "labels": {"run": run}} for run, address in targets.items()
    ]
    return yaml.safe_dump(config, sort_keys=False)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    """A healthy demo and one per `--fault` (from update 3 on), scraped by one Prometheus."""
    with contextlib.ExitStack() as stack:
        demos = {
            fault: stack.enter_context(start_demo("--seed", "7", "--fault", fault, "--fault-after", "2"))
            for fault in FAULTS
        }
        rules = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
        start = time.time()
        targets = {run_name(fault): d.address for fault, d in demos.items()}
        prom = stack.enter_context(start_prometheus(labelled_config(targets), rule_files=rules))
        updates = CATALOG["ppo_updates"].name
        poll(
            lambda: len(prom.query(f"{updates} >= {MIN_UPDATES}")) == len(FAULTS),
            timeout=420,
            interval=1.0,
            what=f"{MIN_UPDATES} updates scraped from every demo",
        )
        at = poll(lambda: prom.settled_at(len(FAULTS)), timeout=120, interval=0.5, what="a time every demo was up")
        yield Live(prom, at, start, {f: d.address for f, d in demos.items()}, {f: run_name(f) for f in demos})


def raw(run: Live, expr: str) -> dict[tuple[str, ...], float]:
    """{label values: value} of an instant query at the evaluation time."""
    body = run.prom.api("/api/v1/query", query=expr, time=f"{run.at:.3f}")
    return {
        tuple(v for k, v in sorted(r["metric"].items()) if k != "__name__"): float(r["value"][1])
        for r in body["data"]["result"]
    }


def single(run: Live, expr: str) -> float:
    (value,) = raw(run, expr).values()
    return value


def live_problems(run: Live, dashboard: dict[str, Any], name: str, keep_name: bool = False) -> list[str]:
    """Every difference between what Grafana shows for one demo run, picked by the `run` variable, and the records.

    Legends and stats must name the run (`name`), never the random port its instance has.
    """
    values = {"job": "tele", "run": grafana_escape(name), "instance": ".*", "env": ".*"}
    window = max(int(run.at - run.start), 10)
    shown = grafana_display(dashboard, panel_responses(run.prom, dashboard, run.at, values, window), keep_name)
    at = f'{{run="{name}"}}'
    c = CATALOG
    kl, cv, ratio = c["kl_divergence"], c["gradient_cv"], c["seed_grad_ratio"]
    problems = []
    for title, want in (
        (KL, {name: levelled(kl, single(run, kl.name + at))}),
        ("Gradient CV", {name: levelled(cv, single(run, cv.name + at))}),
        (CV, {name: labelled(cv, single(run, cv.name + at))}),
        (STALE, {name: colour("ok")}),
    ):
        got = {v["name"]: (v["text"], v["color"]) for v in by_title(dashboard, shown, title)["values"]}
        if title == STALE:
            got = {name: col for name, (_, col) in got.items()}
        problems += compare(title, want, got)
    for clip in ("pre", "post"):
        title = f"Policy gradient norm, {clip}-clip"
        names = [v["name"] for v in by_title(dashboard, shown, title)["values"]]
        if names != [f"{name} {clip}-clip"]:
            problems.append(f"{title}: legend {names}")

    cur, prev = raw(run, c["head_grad_norm"].name + at), raw(run, c["head_grad_norm_prev"].name + at)
    entropy = raw(run, HEAD_ENTROPY.name + at)
    shape, heads = table_rows(by_title(dashboard, shown, HEADS), ["Run", *HEAD_COLUMNS], lambda cells: cells["Head"][0])
    problems += [f"{HEADS}: row of run {r['Run'][0]!r}" for r in heads.values() if r["Run"][0] != name]
    problems += shape
    firsts = raw(run, c["nonfinite_first_step"].name + at)
    states = {key[:-1]: key[-1] for key in raw(run, f"{c['head_gradient_state'].name}{at} == 1")}  # state sorts last
    want_heads = {}
    for key, v in cur.items():
        cells = head_cells(v, prev[key], entropy.get(key, math.nan), CATALOG, firsts.get(key), states.get(key))
        if key not in entropy:
            del cells["Entropy"], cells["Entropy level"]
        want_heads[key[0]] = cells
    got_heads = {k: {col: row.get(col) for col in want_heads.get(k, HEAD_VALUES)} for k, row in heads.items()}
    problems += compare(HEADS, want_heads, got_heads)
    problems += compare(
        HEADS,
        {k: "other" if k == "value" else "action" for k in want_heads},  # the demo's value head is a group
        {k: row.get("Kind", ("",))[0] for k, row in heads.items()},
    )

    ratios = raw(run, ratio.name + at)
    exploding = raw(run, c["seed_gradient_exploding"].name + at)
    vanishing = raw(run, c["seed_gradient_vanishing"].name + at)
    gains = raw(run, GAIN.name + at)
    shape, seeds = table_rows(
        by_title(dashboard, shown, SEEDS), ["Run", *SEED_COLUMNS], lambda cells: (cells["Env"][0], cells["Slot"][0])
    )
    problems += shape
    problems += [f"{SEEDS}: row of run {r['Run'][0]!r}" for r in seeds.values() if r["Run"][0] != name]
    want_seeds = {}
    for key, value in ratios.items():
        e, v = exploding[key] == 1, vanishing[key] == 1
        env, slot = key[0], key[4]
        want_seeds[(env, slot)] = {
            "Gradient": seed_display(value, e, v),
            "Ratio": neutral(value, ratio.precision),
            "Backward gain": neutral(gains.get(key, math.nan), GAIN.precision),
            "Exploding": flag_cell(e, "exploding"),
            "Vanishing": flag_cell(v, "vanishing"),
        }
        if key not in gains:  # no pass with data yet: the gain is missing, not 0
            del want_seeds[(env, slot)]["Backward gain"]
    got_seeds = {k: {col: row.get(col) for col in want_seeds.get(k, SEED_VALUES)} for k, row in seeds.items()}
    problems += compare(SEEDS, want_seeds, got_seeds)
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_demo_runs_show_as_the_records_say(live: Live, fault: str) -> None:
    assert live_problems(live, board(), live.runs[fault]) == []
    assert live_problems(live, board(), live.runs[fault], keep_name=True) == []


@pytest.mark.slow
def test_old_tables_split_on_real_runs(live: Live) -> None:
    broken = copy.deepcopy(board())
    _old_tables(broken)
    problems = live_problems(live, broken, live.runs["none"])
    assert any("more than one row" in line for line in problems), problems


@pytest.mark.slow
def test_runs_side_by_side_are_named_by_their_run_whatever_their_port(live: Live) -> None:
    """All runs at once ("All" in every variable): each legend, stat and table row names its own run."""
    dashboard = board()
    window = max(int(live.at - live.start), 10)
    shown = grafana_display(dashboard, panel_responses(live.prom, dashboard, live.at, ALL, window))
    runs = set(live.runs.values())
    assert len(runs) == len(FAULTS) >= 2
    for title in (KL, "Gradient CV", CV, STALE):
        assert sorted(v["name"] for v in by_title(dashboard, shown, title)["values"]) == sorted(runs), title
    for clip in ("pre", "post"):
        names = [v["name"] for v in by_title(dashboard, shown, f"Policy gradient norm, {clip}-clip")["values"]]
        assert sorted(names) == sorted(f"{r} {clip}-clip" for r in runs)
    levels = by_title(dashboard, shown, dashboards.LEVELS_TITLE)["table"]
    assert levels["columns"][:2] == ["Run", "Instance"]
    rows = {(row[0]["text"], row[1]["text"]) for row in levels["rows"]}
    assert rows == {(live.runs[f], live.instances[f]) for f in FAULTS}  # one row per run, its instance beside it
    for title in (HEADS, SEEDS):
        table = by_title(dashboard, shown, title)["table"]
        assert {row[0]["text"] for row in table["rows"]} <= runs and table["columns"][0] == "Run", title
