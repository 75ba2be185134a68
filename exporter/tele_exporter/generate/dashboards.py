"""Grafana dashboard "TELE training health": which panel goes where, and what each asks of the catalog.

The panels are generate/panels.py's, their level colours and codes generate/levels.py's, so this is only layout.
"""

from __future__ import annotations

import json

from ..catalog.labels import GRADIENT_STATES
from ..catalog.model import Catalog, MetricSpec
from ..catalog.thresholds import THRESHOLD_METRIC, movable
from . import panels
from .levels import (
    count_steps,
    flag_codes,
    flag_steps,
    grafana_unit,
    healthy_unit,
    level_code_mappings,
    level_code_query,
    level_steps,
    neutral_steps,
    seed_mappings,
    seed_query,
    seed_value_steps,
    stale_steps,
    trend_mappings,
    trend_query,
    with_nan,
)
from .panels import LEGEND, Json, named, thresholds
from .promql import RunStarts, matcher, number, selector, threshold_selector

PATH = "grafana/dashboards/tele-training-health.json"
UID = "tele-training-health"
TITLE = "TELE training health"
TAGS = ["tele", "pytorch", "rl"]
SCHEMA_VERSION = 42
PROMETHEUS_UID = "tele-prometheus"
WIDTH = 24
# The series the dashboard's job, run and instance variables select ("All" is .*, which also
# matches a series without the label, so runs that set no `run` label stay in view).
VARIABLES = (matcher("job", "$job", "=~"), matcher("run", "$run", "=~"), matcher("instance", "$instance", "=~"))
# Per-run stats read each run's level at the end of the range: a series is in one query only.
AT_END = " @ end()"
# The query of a per-run stat that holds the series in no level at the end (NaN, or gone before it).
REST_REF = "A"
LEVELS_TITLE = "Levels per run"
OWN_LABEL = (
    " The label is the level of each run's own thresholds (tele_threshold, the catalog's unless the run sets"
    " its own), compared as the alert rules compare."
)


def files(catalog: Catalog) -> dict[str, str]:
    """The dashboard JSON file, deterministic (sorted keys, two-space indent)."""
    return {PATH: json.dumps(dashboard(catalog), indent=2, sort_keys=True, ensure_ascii=False) + "\n"}


class _Grid:
    """Lays panels out left to right on the 24-column grid, under row headings, and numbers them."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.panels: list[Json] = []
        self.next_id = 1
        self.y = 0
        self.x = 0
        self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        heading = panels.row(title)
        heading["gridPos"] = {"h": 1, "w": WIDTH, "x": 0, "y": self.y}
        heading["id"] = self._id()
        self.panels.append(heading)
        self.y += 1

    def add(self, panel: Json, w: int, h: int) -> None:
        if self.x + w > WIDTH:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        panel.setdefault("datasource", panels.DATASOURCE)
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)

    def _newline(self) -> None:
        self.y += self.row_height
        self.x = 0
        self.row_height = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def _sel(spec: MetricSpec, labels: dict[str, str] | None = None, *, env: bool = False, suffix: str = "") -> str:
    """The metric selected by the dashboard's job/instance (and env) variables, and `labels`."""
    matchers = [*VARIABLES, matcher("env", "$env", "=~")] if env else VARIABLES
    return selector(f"{spec.name}{suffix}", labels, matchers=matchers)


def _line(expr: str, legend: str = LEGEND) -> list[Json]:
    """The one target of a panel: `expr` per run, its legend naming the instance and rank."""
    return [panels.target(named(expr), legend=legend)]


def _level_code(catalog: Catalog, spec: MetricSpec, expr: str, at: str = "") -> str:
    """The index of each series' level among its own run's levels (tele_threshold; the catalog's without)."""
    name = catalog[THRESHOLD_METRIC].name

    def threshold(level: str | None) -> str:
        return threshold_selector(name, spec.name, level, matchers=VARIABLES)

    return level_code_query(RunStarts(spec, threshold, at), expr)


def _description(spec: MetricSpec, note: str = "") -> str:
    tele = ", ".join(spec.tele)
    source = f" ({tele}, `{spec.name}`)" if tele else f" (`{spec.name}`)"
    return spec.question + source + (f" {note}" if note else "")


def _boundary_note(spec: MetricSpec, steps: bool = True) -> str:
    """Plain words on the catalog's levels and, where threshold `steps` draw them, how exactly."""
    words = ", ".join(f"{lv.label.replace('{value}', 'value')} {lv.when}" for lv in spec.levels)
    opened = [lv.when.low for lv in spec.levels if not lv.when.low_closed]
    note = f"Levels from the catalog: {words}."
    if opened and steps:
        bounds = ", ".join(repr(v) for v in opened)
        note += (
            f" Grafana colours a step from its value upward (>=); the steps after {bounds}"
            " sit at the next double above it, so a value of exactly the boundary keeps"
            " the lower level's colour as the catalog says."
        )
    return note


def _stat(
    spec: MetricSpec,
    title: str,
    expr: str,
    *,
    catalog: Catalog,
    graph: bool,
    mappings: list[Json] | None = None,
    steps: list[Json] | None = None,
    color_mode: str = "value",
    note: str = "",
    description: str | None = None,
    decimals: int | None = None,
    unit: str | None = None,
) -> Json:
    """A stat of `expr` per run, by default in `spec`'s precision and unit, coloured by the catalog's levels."""
    return panels.stat(
        title,
        description if description is not None else _description(spec, note),
        _line(expr),
        decimals=spec.precision if decimals is None else decimals,
        mappings=with_nan(catalog, mappings or []),
        steps=steps if steps is not None else level_steps(catalog, spec),
        unit=grafana_unit(spec) if unit is None else unit,
        graph=graph,
        color_mode=color_mode,
    )


def _own_levels_stat(spec: MetricSpec, title: str, value: str, *, catalog: Catalog, note: str) -> Json:
    """A number stat coloured by each run's own levels: one query per level, painted in its colour.

    Query `level.name` holds the series whose run puts its value at the range's end in that
    level (tele_threshold, compared as the alert rules compare; the catalog's starts without
    it), so the sparkline stays and its colour is the current level. REST_REF holds the rest,
    NaN at the end (shown "NaN" in the critical colour: a value mapping beats the fixed colour)
    or gone before it, coloured by the catalog's thresholds.
    """
    code = _level_code(catalog, spec, value + AT_END, AT_END)
    words = (
        " Each run's number is coloured by its own levels (the starts it exports as tele_threshold;"
        " the catalog's unless Telemetry(thresholds=...) moved them) at the end of the time range."
    )
    rest = panels.target(named(f"{value} unless ({code}) >= 0"), REST_REF, LEGEND)
    levels = [
        panels.target(named(f"{value} and ({code}) == {i}"), level.name, LEGEND) for i, level in enumerate(spec.levels)
    ]
    return panels.stat(
        title,
        _description(spec, note + words),
        [rest, *levels],
        decimals=spec.precision,
        mappings=with_nan(catalog, []),
        steps=level_steps(catalog, spec),
        unit=grafana_unit(spec),
        graph=True,
        overrides=[panels.fixed(level.name, catalog.colour(level.status)) for level in spec.levels],
    )


def _label_stat(spec: MetricSpec, title: str, *, catalog: Catalog, note: str) -> Json:
    """A stat showing each run's level label on its own levels, in the level's colour."""
    return _stat(
        spec,
        title,
        _level_code(catalog, spec, _sel(spec)),
        catalog=catalog,
        graph=False,
        mappings=level_code_mappings(catalog, spec),
        steps=neutral_steps(catalog),
        color_mode="background",
        note=note,
    )


def _own_starts(catalog: Catalog, spec: MetricSpec) -> tuple[list[Json], list[Json]]:
    """Dashed lines at each run's own level starts where they differ from the catalog's (targets, overrides)."""
    targets, overrides = [], []
    for level in movable(spec):
        ref = f"own {level.name}"
        start = threshold_selector(catalog[THRESHOLD_METRIC].name, spec.name, level.name, matchers=VARIABLES)
        targets.append(panels.target(named(f"{start} != {number(level.when.low)}"), ref, f"{LEGEND} {level.name}"))
        dash = {"fill": "dash", "dash": [10, 10]}
        style = {"custom.lineStyle": dash, "custom.lineWidth": 1}
        overrides.append(panels.fixed(ref, catalog.colour(level.status), **style))
    return targets, overrides


def _timeseries(
    spec: MetricSpec,
    title: str,
    targets: list[Json],
    *,
    catalog: Catalog,
    steps: list[Json] | None = None,
    note: str = "",
    minimum: float | None = 0,
) -> Json:
    """Lines per run over the catalog's threshold bands, plus the dashed own starts of runs that moved them.

    With `steps` of its own the panel has no levels to move, and draws no own starts.
    """
    own, overrides = ([], []) if steps is not None else _own_starts(catalog, spec)
    if own:
        note += (
            " Dashed lines: a run's own level starts (tele_threshold), drawn only where they differ"
            " from the catalog's; the bands are the catalog's levels."
        )
    return panels.timeseries(
        title,
        _description(spec, note),
        [*targets, *own],
        decimals=spec.precision,
        mappings=with_nan(catalog, []),
        steps=steps if steps is not None else level_steps(catalog, spec),
        unit=grafana_unit(spec),
        minimum=minimum,
        overrides=overrides,
    )


def _table(
    spec: MetricSpec,
    title: str,
    columns: dict[str, tuple[str, Json]],
    *,
    catalog: Catalog,
    defaults: Json,
    description: str,
) -> Json:
    """One row per series of `spec.labels`; NaN in any column reads "NaN" in the critical colour."""
    mapped = {"mappings": with_nan(catalog, []), **defaults}
    return panels.table(title, description, columns, labels=spec.labels, defaults=mapped)


def _policy_row(g: _Grid) -> None:
    c = g.catalog
    kl, early, updates = c["kl_divergence"], c["ppo_early_stops"], c["ppo_updates"]
    g.row("Policy")
    g.add(_own_levels_stat(kl, "KL divergence", _sel(kl), catalog=c, note=_boundary_note(kl)), 6, 8)
    g.add(_timeseries(kl, "KL divergence over time", _line(_sel(kl)), catalog=c, note=_boundary_note(kl)), 12, 8)
    for spec, title in ((updates, "PPO updates in range"), (early, "Early stops in range")):
        total = f"sum by (run, instance, rank) (increase({_sel(spec)}[$__range]))"
        g.add(_stat(spec, title, total, catalog=c, graph=False, steps=neutral_steps(c)), 3, 4)


def _levels_row(g: _Grid) -> None:
    """One row per run: the level KL, pre-clip gradient norm and CV are in, on the run's own thresholds."""
    c = g.catalog
    kl, norm, cv = c["kl_divergence"], c["policy_grad_norm"], c["gradient_cv"]
    columns = {
        header: (
            _level_code(c, spec, _sel(spec, dict(spec.alert_on))),
            {"mappings": with_nan(c, level_code_mappings(c, spec))},
        )
        for header, spec in (("KL", kl), ("Gradient norm (pre-clip)", norm), ("Gradient CV", cv))
    }
    description = _description(
        c[THRESHOLD_METRIC],
        "The level each run is in on its own thresholds (the starts it exports; the catalog's unless "
        "Telemetry(thresholds=...) moved them), compared with the alert rules' operators: the level "
        "shown is the level alerted on. The number panels colour each run by the same levels.",
    )
    defaults = {"decimals": 0, "thresholds": thresholds(neutral_steps(c)), "unit": "none"}
    g.add(_table(kl, LEVELS_TITLE, columns, catalog=c, defaults=defaults, description=description), 24, 6)


def _policy_health_row(g: _Grid) -> None:
    """TELE-120/121/124/130/140/151/200 and the action std: entropy, velocity, collapse, clipping, value, advantages."""
    c = g.catalog
    ent, vel, collapsed = c["policy_entropy"], c["entropy_velocity"], c["entropy_collapsed"]
    cf, side, ev, adv, ratio = (
        c["clip_fraction"],
        c["clip_fraction_side"],
        c["explained_variance"],
        c["advantage_std"],
        c["head_ratio_max"],
    )
    g.row("Policy health")
    g.add(_own_levels_stat(ent, "Policy entropy", _sel(ent), catalog=c, note=_boundary_note(ent)), 6, 8)
    velocity_note = (
        f"{_boundary_note(vel, steps=False)} The recording rule instance:{ent.name}:deriv_per_update5m is the same"
        " slope from PromQL (deriv over 5m per update), an approximation: its window is time, not 10 updates."
    )
    g.add(_label_stat(vel, "Entropy velocity", catalog=c, note=velocity_note + OWN_LABEL), 4, 8)
    collapsed_note = _boundary_note(collapsed, steps=False) + OWN_LABEL
    g.add(_label_stat(collapsed, "Entropy collapsed", catalog=c, note=collapsed_note), 4, 8)
    g.add(_timeseries(ent, "Policy entropy over time", _line(_sel(ent)), catalog=c, note=_boundary_note(ent)), 10, 8)
    entn = c["entropy_normalized"]
    g.add(_own_levels_stat(entn, "Policy entropy, normalised", _sel(entn), catalog=c, note=_boundary_note(entn)), 6, 8)
    g.add(
        _timeseries(entn, "Normalised entropy over time", _line(_sel(entn)), catalog=c, note=_boundary_note(entn)),
        18,
        8,
    )
    g.add(_own_levels_stat(cf, "PPO clip fraction", _sel(cf), catalog=c, note=_boundary_note(cf)), 6, 8)
    sides = _line(_sel(side), LEGEND + " {{side}}")
    g.add(_timeseries(side, "PPO clip fraction by side", sides, catalog=c, steps=neutral_steps(c)), 6, 8)
    g.add(_own_levels_stat(ev, "Explained variance", _sel(ev), catalog=c, note=_boundary_note(ev)), 6, 8)
    g.add(_own_levels_stat(adv, "Advantage std", _sel(adv), catalog=c, note=_boundary_note(adv)), 6, 8)
    heads = _line(_sel(ratio), LEGEND + " {{head}}")
    g.add(_timeseries(ratio, "Importance ratio max per head", heads, catalog=c, note=_boundary_note(ratio)), 12, 8)
    head_cf = c["head_clip_fraction"]
    head_cf_note = (
        "Display only: the records give the joint clip fraction levels (above, which page), none per head."
        " A per-head surrogate clips each head on its own; a low joint fraction can hide one head clipped"
        " heavily, and mildly clipped heads can multiply into a high joint one."
    )
    lines = _line(_sel(head_cf), LEGEND + " {{head}}")
    g.add(
        _timeseries(head_cf, "PPO clip fraction per head", lines, catalog=c, steps=neutral_steps(c), note=head_cf_note),
        12,
        8,
    )
    for lp, title in ((c["log_prob_min"], "Log-probability min"), (c["log_prob_max"], "Log-probability max")):
        # The catalog's levels: none of them starts above 0, so a run cannot move them (no tele_threshold).
        g.add(_stat(lp, title, _sel(lp), catalog=c, graph=True, note=_boundary_note(lp)), 6, 8)
    lp_min, lp_max = c["log_prob_min"], c["log_prob_max"]
    extremes = [
        panels.target(named(_sel(lp_min)), legend=LEGEND + " min"),
        panels.target(named(_sel(lp_max)), ref="B", legend=LEGEND + " max"),
    ]
    extremes_note = (
        f"{_boundary_note(lp_min, steps=False)} Bands: the minimum's levels (TELE-160), which page on runs on the"
        f" records' scale; the maximum (TELE-161) is coloured in its stat, and never pages."
    )
    g.add(
        _timeseries(
            lp_min, "Log-probability min and max over time", extremes, catalog=c, note=extremes_note, minimum=None
        ),
        12,
        8,
    )
    std = c["policy_std"]
    std_note = "No levels: a Gaussian policy's own scale. Empty for a categorical policy."
    std_panel = _timeseries(
        std, "Action std (Gaussian policy)", _line(_sel(std)), catalog=c, steps=neutral_steps(c), note=std_note
    )
    g.add(std_panel, 24, 8)


def _gradients_row(g: _Grid) -> None:
    c = g.catalog
    norm, hist = c["policy_grad_norm"], c["step_policy_grad_norm"]
    note = _boundary_note(norm) + " Alerts watch the pre-clip norm; post-clip never exceeds max_norm."
    g.row("Gradients")
    for clip, word in (("pre", "pre-clip"), ("post", "post-clip")):
        lines = _line(_sel(norm, {"clip": clip}), f"{LEGEND} {word}")
        g.add(_timeseries(norm, f"Policy gradient norm, {word}", lines, catalog=c, note=note), 8, 9)
    buckets = f"sum by (le) (increase({_sel(hist, dict(norm.alert_on), suffix='_bucket')}[$__rate_interval]))"
    g.add(
        panels.heatmap(
            "Policy gradient norm per optimizer step (pre-clip)",
            _description(hist),
            panels.target(buckets, legend="{{le}}", format="heatmap"),
            unit=grafana_unit(hist),
        ),
        8,
        9,
    )


def _heads_row(g: _Grid) -> None:
    c = g.catalog
    cur, prev = c["head_grad_norm"], c["head_grad_norm_prev"]
    assert prev.trend is not None
    g.row("Action heads")
    code = trend_query(_sel(cur), _sel(prev), prev.trend)
    rules = "; ".join(f"current in {ctx.when}: up {ctx.up}, down {ctx.down}" for ctx in prev.trend.context)
    note = (
        f"delta = {cur.name} - {prev.name}; stable (→) while delta is in {prev.trend.stable}."
        f' Arrow colours by context: {rules}. "no trend": a head without gradient (NaN).'
    )
    trend = {"mappings": with_nan(c, trend_mappings(c, prev)), "decimals": 0}
    ent = c["head_entropy"]
    entropy = {"decimals": ent.precision}
    level = {"decimals": 0, "mappings": with_nan(c, level_code_mappings(c, ent))}
    note += (
        f" Entropy: {ent.name} (TELE-170), {_boundary_note(ent, steps=False)} Entropy level: the head's level"
        " on its run's own levels (tele_threshold; the catalog's without), in its colour; a table colours a cell"
        " by its own column only, so the number beside it stays plain."
    )
    norm_level = {"decimals": 0, "mappings": with_nan(c, level_code_mappings(c, cur))}
    state, first = c["head_gradient_state"], c["nonfinite_first_step"]
    state_code = f"sum without (state) ({_state_code(state)})"
    state_cell = {"decimals": 0, "mappings": with_nan(c, state_mappings(c))}
    note += (
        f" Norm level: TELE-320's level of the current norm ({_boundary_note(cur, steps=False)}), on its run's own"
        f" levels, in its colour; display only (heads page on change, below). State: {state.name}, the head's"
        f" gradient state in the latest update. First non-finite step: {first.name}, the latest update's first"
        " step with a NaN or Inf norm, on the head(s) non-finite there only (empty for the others)."
    )
    columns: dict[str, tuple[str, Json]] = {
        "Current": (_sel(cur), {}),
        "Previous": (_sel(prev), {}),
        "Trend": (code, trend),
        "Entropy": (_sel(ent), entropy),
        "Entropy level": (_level_code(c, ent, _sel(ent)), level),
        "Norm level": (_level_code(c, cur, _sel(cur)), norm_level),
        "State": (state_code, state_cell),
        "First non-finite step": (_sel(first), {"decimals": 0}),
    }
    defaults = {"decimals": cur.precision, "thresholds": thresholds(neutral_steps(c)), "unit": grafana_unit(cur)}
    title = "Action heads: gradient norm, trend and entropy"
    g.add(_table(cur, title, columns, catalog=c, defaults=defaults, description=_description(prev, note)), 24, 9)
    per_head = _line(_sel(cur), LEGEND + " {{head}}")
    spike = (
        "Each head and group on its own: TeleHeadGradNormSpike pages when one leaves 10x (warning) or 100x"
        " (critical) its own median of the last 30m, so an actor is not hidden behind a critic-dominated total."
    )
    spike += f" Bands: TELE-320's levels ({_boundary_note(cur, steps=False)}), display only."
    g.add(_timeseries(cur, "Gradient norm per head over time", per_head, catalog=c, note=spike), 24, 8)


def _state_code(state: MetricSpec) -> str:
    """Each head's gradient state as its index in GRADIENT_STATES, summed without `state` (0: finite, no term)."""
    return "\nor ".join(f"{_sel(state, {'state': name})} * {i}" for i, name in enumerate(GRADIENT_STATES) if i)


def state_mappings(catalog: Catalog) -> list[Json]:
    """Value mappings from a gradient-state index to its name: finite ok, nonfinite critical, the others neutral."""
    status = {"finite": "ok", "nonfinite": "critical"}
    options = {
        str(i): {"color": catalog.colour(status.get(name, "neutral")), "index": i, "text": name}
        for i, name in enumerate(GRADIENT_STATES)
    }
    return [{"type": "value", "options": options}]


LOG_FLOOR = 1e-8
"""The layer heatmap's floor: log10 of a norm below it (a dead layer, or exactly 0) shows as log10(LOG_FLOOR)."""


def _layers_row(g: _Grid) -> None:
    """Telemetry(layers=...): the layers x time heatmap, dead layers, and how far each update moves heads and layers."""
    c = g.catalog
    norm, dead = c["layer_grad_norm"], c["dead_layers"]
    head_ratio, layer_ratio = c["head_update_ratio"], c["layer_update_ratio"]
    g.row("Layers and update ratios")
    floor = number(LOG_FLOOR)
    heat = f"log10(clamp_min({_sel(norm)}, {floor}))"
    spike = (
        f"Each row a layer (its module path, or the user's group), each column a scrape; the colour is log10 of the"
        f" layer's gradient norm (mean over the update's steps, pre-clip), floored at {floor}: a dead layer"
        " (below 1e-7 all update long) sits at the bottom of the scale. TeleLayerGradNormSpike pages when one layer"
        " leaves 10x (warning) or 100x (critical) its own median of the last 30m. Empty without Telemetry(layers=...)."
    )
    g.add(
        panels.rows_heatmap(
            "Gradient norm per layer over time (log10)",
            _description(norm, spike),
            panels.target(named(heat), legend=f"{LEGEND} layer {{{{layer}}}}"),
            unit="none",
        ),
        16,
        10,
    )
    g.add(_own_levels_stat(dead, "Dead layers", _sel(dead), catalog=c, note=_boundary_note(dead)), 8, 10)
    rule = (
        " The levels are display only: CS231n's rule of thumb is about 1e-3 per optimizer step, and an update"
        " of K steps moves between sqrt(K) and K times that (docs/layers.md); no alert pages on them."
    )
    for spec, title in (
        (head_ratio, "Update-to-weight ratio per head"),
        (layer_ratio, "Update-to-weight ratio per layer"),
    ):
        columns: dict[str, tuple[str, Json]] = {
            "Ratio": (_sel(spec), {}),
            "Level": (
                _level_code(c, spec, _sel(spec)),
                {"decimals": 0, "mappings": with_nan(c, level_code_mappings(c, spec))},
            ),
        }
        defaults = {
            "decimals": spec.precision,
            "thresholds": thresholds(level_steps(c, spec)),
            "unit": grafana_unit(spec),
        }
        note = _boundary_note(spec, steps=False) + rule
        g.add(_table(spec, title, columns, catalog=c, defaults=defaults, description=_description(spec, note)), 8, 8)
    lines = _line(_sel(layer_ratio), f"{LEGEND} {{{{layer}}}}")
    note = _boundary_note(layer_ratio) + rule
    g.add(_timeseries(layer_ratio, "Update-to-weight ratio per layer over time", lines, catalog=c, note=note), 8, 8)


def _cv_row(g: _Grid) -> None:
    c = g.catalog
    cv = c["gradient_cv"]
    note = _boundary_note(cv)
    g.row("Gradient CV")
    g.add(_own_levels_stat(cv, "Gradient CV", _sel(cv), catalog=c, note=note), 6, 8)
    g.add(_label_stat(cv, "Gradient CV status", catalog=c, note=OWN_LABEL.strip()), 6, 8)
    g.add(_timeseries(cv, "Gradient CV over time", _line(_sel(cv)), catalog=c, note=note), 12, 8)


def _seeds_row(g: _Grid) -> None:
    c = g.catalog
    ratio = c["seed_grad_ratio"]
    r = _sel(ratio, env=True)
    codes = flag_codes(ratio)
    # Priority as TELE-557 shows it: each raised flag's code in turn, then the ratio itself.
    # `or` picks the first that exists per seed, with no arithmetic on the ratio (Inf * 0 is NaN).
    raised = [f"{code} * ({_sel(c[flag], env=True)} == 1)" for flag, code in codes.items()]
    gradient = {
        "mappings": seed_mappings(c, ratio),
        "unit": healthy_unit(ratio),
        "thresholds": thresholds(seed_value_steps(c, ratio)),
    }
    columns: dict[str, tuple[str, Json]] = {
        "Gradient": (seed_query(ratio, raised, r, _level_code(c, ratio, r)), gradient),
        "Ratio": (r, {}),
        "Backward gain": (_sel(c["seed_backward_gain"], env=True), {}),
    }
    for flag in codes:
        steps = thresholds(flag_steps(c, ratio, c[flag]))
        level = next(lv for lv in ratio.levels if lv.flag == flag)
        columns[level.name.capitalize()] = (_sel(c[flag], env=True), {"decimals": 0, "thresholds": steps})
    flags = ", then ".join(c[flag].name for flag in codes)
    no_data = ratio.level_of(0.0)
    note = (
        f"{_boundary_note(ratio, steps=False)} Gradient column: {flags}, then the ratio's level on its run's own levels"
        f" (tele_threshold; the catalog's without), compared as the alert rules compare"
        f' (a ratio of 0, no gradient data, shows "{no_data.label if no_data else 0}"). A table colours a cell'
        " by its own column only, so the Ratio beside it stays plain."
    )
    defaults = {"decimals": ratio.precision, "thresholds": thresholds(neutral_steps(c)), "unit": grafana_unit(ratio)}
    g.row("Seeds")
    title = "Seeds: gradient flow per env and slot"
    g.add(_table(ratio, title, columns, catalog=c, defaults=defaults, description=_description(ratio, note)), 24, 10)


def _alerts_row(g: _Grid) -> None:
    c = g.catalog
    last = c["last_update_timestamp"]
    g.row("Alerts")
    g.add(
        panels.alertlist(
            "Tele alerts firing",
            "Which Tele alerts are firing now? Rules come from the Prometheus data"
            " source (generated from the catalog); this list is not a PromQL query.",
            alert_name="Tele",
            max_items=20,
        ),
        12,
        8,
    )
    firing = selector(
        "ALERTS", matchers=[matcher("alertname", "Tele.*", "=~"), matcher("alertstate", "firing"), *VARIABLES]
    )
    g.add(
        _stat(
            last,
            "Tele alerts firing (count)",
            f"count({firing}) or vector(0)",
            catalog=c,
            graph=False,
            steps=count_steps(c),
            color_mode="background",
            decimals=0,
            unit="none",
            description="How many Tele alerts are firing now for the selected instances?"
            " (Prometheus ALERTS series, 0 when none.)",
        ),
        6,
        8,
    )
    stale = next(a for a in last.alerts if a.kind == "stale")
    # Whole seconds, rounded up: ceil(x) > limit exactly when x > limit, so the colour turns
    # with the alert and the text ("00:10:00" / "00:10:01") differs across it.
    seconds = f"ceil(time() - max by (run, instance, rank) ({_sel(last)}))"
    g.add(
        _stat(
            last,
            "Time since the last PPO update",
            seconds,
            catalog=c,
            graph=False,
            steps=stale_steps(c, last),
            unit="dthms",  # "00:09:59", "00:10:00" green; "00:10:01" red
            note=f"Red once the latest update is older than {stale.after}, when {stale.name} fires.",
        ),
        6,
        8,
    )


def dashboard(catalog: Catalog) -> Json:
    """The whole dashboard as a plain dict (classic JSON model, rows as row panels)."""
    grid = _Grid(catalog)
    for row in (
        _policy_row,
        _levels_row,
        _policy_health_row,
        _gradients_row,
        _heads_row,
        _cv_row,
        _layers_row,
        _seeds_row,
        _alerts_row,
    ):
        row(grid)
    updates = catalog["ppo_updates"].name
    ratio = catalog["seed_grad_ratio"].name
    variables = [
        panels.datasource_variable(PROMETHEUS_UID),
        panels.query_variable("job", "Job", updates),
        panels.query_variable("run", "Run", selector(updates, matchers=VARIABLES[:1])),
        panels.query_variable("instance", "Instance", selector(updates, matchers=VARIABLES[:2])),
        panels.query_variable("env", "Env", selector(ratio, matchers=VARIABLES)),
    ]
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "Training health of a PPO run, coloured by the TELE records' thresholds"
        " (generated from the tele-exporter catalog; do not edit by hand).",
        "editable": False,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": grid.panels,
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": TAGS,
        "templating": {"list": variables},
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": TITLE,
        "uid": UID,
        "version": 1,
        "weekStart": "",
    }
