"""The live page at / and its /api/snapshot document; the page is checked in headless Chromium.

Browser tests run the demo trainer twice, healthy and with a fault, and read both
the DOM statuses and the screenshot's pixel colours against the catalog's levels.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytest
import torch
from torch import nn

from tele_exporter import Telemetry, serve
from tele_exporter.catalog import Catalog, default_catalog
from tele_exporter.catalog.display import show
from tele_exporter.server.http import Server

from ..conftest import TinyPolicy, backward
from .cdp import Chromium
from .live import PAGE_TIMEOUT_S, Shot, capture, demo_run, snapshot_document

STATUSES = {"ok", "warning", "critical", "neutral"}
HEALTHY_UPDATES = 3
FAULT = "explode"


class Gain(nn.Module):
    """A seed beside a host layer of the same shape whose parameter gradients are `k` times the host's."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k
        self.lin = nn.Linear(4, 4, bias=False)
        self.host = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host(x) + self.k * self.lin(x)


@pytest.fixture
def server(tele: Telemetry) -> Iterator[Server]:
    srv = serve(tele, port=0)
    yield srv
    srv.close()


def _get(server: Server, path: str) -> tuple[str, str, bytes]:
    with urllib.request.urlopen(server.base_url + path, timeout=10) as resp:
        return resp.headers["Content-Type"], resp.headers.get("Cache-Control", ""), resp.read()


def _thresholds(catalog: Catalog) -> set[float]:
    """Every number in the catalog that a level, colour or trend decision depends on."""
    found: set[float] = set()
    for spec in catalog:
        found.update(spec.thresholds())
        if spec.trend is not None:
            found.update(abs(v) for v in spec.trend.stable.edges())
        if spec.history_stable:
            found.add(spec.history_stable)
        if spec.early_stop_factor is not None:
            found.add(spec.early_stop_factor)
    return found - {0.0}


# --- the page as served -------------------------------------------------------------------


def test_page_is_served_at_root_and_loads_nothing_from_outside(server: Server) -> None:
    content_type, _, body = _get(server, "/")
    html = body.decode()
    assert content_type == "text/html; charset=utf-8"
    assert 'href="metrics"' in html and 'fetch("api/snapshot"' in html
    assert re.findall(r"""(?:src|href|action)\s*=\s*["']?\s*(?:[a-z]+:)?//""", html, re.I) == []
    assert re.findall(r"""url\(|@import|fetch\(\s*["'](?:[a-z]+:)?//""", html, re.I) == []
    svg_namespace = "http://www.w3.org/2000/svg"  # an identifier, never fetched
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) <= {svg_namespace}
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert csp is not None and "default-src 'none'" in csp.group(1) and "connect-src 'self'" in csp.group(1)


def test_page_holds_no_threshold_of_the_catalog(server: Server) -> None:
    """Levels and colours are decided server-side from the catalog; the page only paints them."""
    html = _get(server, "/")[2].decode()
    numbers = {float(n) for n in re.findall(r"(?<![\w#-])\d*\.\d+", html)}
    assert numbers, "the pattern finds the page's decimals"
    assert numbers & _thresholds(default_catalog()) == set()


# --- the /api/snapshot document, beyond tests/server/test_http.py --------------------------------


def test_snapshot_document_shape_is_version_1(server: Server, tele: Telemetry, policy: TinyPolicy) -> None:
    with tele.update() as upd:
        backward(policy)
        upd.clip_grad_norm_(0.5)
    content_type, cache, body = _get(server, "/api/snapshot")
    assert content_type == "application/json; charset=utf-8" and cache == "no-store"
    doc = json.loads(body)
    assert set(doc) == {"version", "colours", "metrics", "snapshot"} and doc["version"] == 1
    assert set(doc["colours"]) == STATUSES
    catalog = default_catalog()
    assert set(doc["metrics"]) == {s.id for s in catalog if s.type != "histogram"}
    for metric_id, metric in doc["metrics"].items():
        levels = {"levels"} if catalog[metric_id].levels else set()
        assert set(metric) == {"name", "tele", "question", "precision"} | levels
    assert doc["metrics"]["policy_grad_norm"]["levels"][2] == {
        "name": "warning",
        "status": "warning",
        "from": 5.0,
        "from_included": False,
        "to": 10.0,
        "to_included": True,
    }
    assert doc["metrics"]["kl_divergence"]["levels"][-1]["to"] is None  # +inf
    snap = doc["snapshot"]
    parts = {"updates", "early_stops", "timestamp", "steps", "heads", "grad_norm", "kl", "gradient_cv", "seeds"}
    assert parts <= set(snap)
    for part in ("grad_norm", "kl", "gradient_cv"):
        assert snap[part]["shown"]["status"] in STATUSES
    assert snap["grad_norm"]["shown"] == asdict(show(catalog["policy_grad_norm"], snap["grad_norm"]["pre"]))
    assert snap["kl"]["trend"] is None  # one KL value (none observed): no history trend yet


def test_missing_values_are_null_and_the_document_is_strict_json(
    server: Server, tele: Telemetry, policy: TinyPolicy
) -> None:
    for u in range(2):
        with tele.update() as upd:
            backward(policy, seed=u, heads=("op",))
            upd.clip_grad_norm_(0.5)
    doc = snapshot_document(server)
    slot = next(h for h in doc["snapshot"]["heads"] if h["name"] == "slot")
    assert slot["current"] is None and slot["steps"] == 0 and slot["trend"] is None
    assert doc["snapshot"]["kl"]["value"] is None and doc["snapshot"]["kl"]["shown"]["label"] == "missing"


@pytest.mark.parametrize(
    ("gain", "label", "status", "flags"),
    [
        (3.0, "▲ EXPLODING", "critical", (False, True)),
        (0.1, "▼ VANISHING", "warning", (True, False)),
        (0.85, "ratio=0.85", "ok", (False, False)),
    ],
)
def test_seeds_carry_the_tele_557_display_label(
    server: Server, tele: Telemetry, policy: TinyPolicy, gain: float, label: str, status: str, flags: tuple[bool, bool]
) -> None:
    seed = Gain(gain)
    tele.watch_seed(seed.lin, host=seed, env=3, slot="r0c1")
    with tele.update() as upd:
        backward(policy)
        x = torch.randn(8, 4)
        (seed(x) * torch.randn(8, 4)).sum().backward()
        upd.clip_grad_norm_(0.5)
    (entry,) = snapshot_document(server)["snapshot"]["seeds"]
    assert (entry["env"], entry["slot"]) == ("3", "r0c1")
    assert entry["ratio"] == pytest.approx(gain, rel=1e-6)
    assert entry["shown"]["label"] == label and entry["shown"]["status"] == status
    assert (entry["vanishing"], entry["exploding"]) == flags
    assert entry["passes"] == 1


def test_unwatched_seed_leaves_the_document(server: Server, tele: Telemetry, policy: TinyPolicy) -> None:
    seed = Gain(1.0)
    watch = tele.watch_seed(seed.lin, host=seed, env=0, slot="a")
    watch.remove()
    with tele.update() as upd:
        backward(policy)
        upd.clip_grad_norm_(0.5)
    assert snapshot_document(server)["snapshot"]["seeds"] == []


# --- the page in headless Chromium --------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    with Chromium() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def healthy(browser: Chromium) -> Shot:
    with demo_run("none", updates=HEALTHY_UPDATES) as (_, server):
        return capture(browser, server)


@pytest.fixture(scope="module")
def faulted(browser: Chromium) -> Shot:
    with demo_run(FAULT, updates=HEALTHY_UPDATES, fault_after=1) as (_, server):
        return capture(browser, server)


def _expected(doc: dict[str, Any]) -> dict[str, str]:
    """Each panel's status as the catalog's levels say for the document's values."""
    catalog, snap = default_catalog(), doc["snapshot"]
    return {
        "kl": show(catalog["kl_divergence"], float(snap["kl"]["value"])).status,
        "grad": show(catalog["policy_grad_norm"], float(snap["grad_norm"]["pre"])).status,
        "cv": show(catalog["gradient_cv"], float(snap["gradient_cv"]["value"])).status,
    }


@pytest.mark.parametrize("run", ["healthy", "faulted"])
@pytest.mark.slow
@pytest.mark.browser
def test_page_shows_the_catalog_levels_in_their_colours(run: str, request: pytest.FixtureRequest) -> None:
    shot: Shot = request.getfixturevalue(run)
    colours = shot.document["colours"]
    expected = _expected(shot.document)
    assert shot.state["updates"] == HEALTHY_UPDATES
    for panel, status in expected.items():
        assert shot.state["panels"][panel] == status, panel
        assert shot.hues[panel] == colours[status], f"{panel}: {status} should be drawn {colours[status]}"
    assert shot.state["spark"] == {"kl": HEALTHY_UPDATES, "grad": HEALTHY_UPDATES, "entropy": HEALTHY_UPDATES}
    assert shot.state["text"]["cv"].split(" ")[-1] in {"stable", "warn", "BAD"}
    # The demo measures its layers: TELE-331's dead-layer count has a row, in its level's words and colour.
    doc, shown = shot.document["snapshot"], shot.document["snapshot"]["dead_layers_shown"]
    assert doc["dead_layers"] == 0 and shown["status"] == "ok"
    assert shot.state["dead"] == {
        "hidden": False,
        "value": "0",
        "label": shown["label"],
        "status": "ok",
        "detail": f"of {len(doc['layers'])} layers",
    }


@pytest.mark.slow
@pytest.mark.browser
def test_each_sparkline_says_what_it_draws(healthy: Shot) -> None:
    """The gradient panel's big number and its sparkline are both pre-clip (TELE-310, TELE-311), and say so."""
    captions = healthy.state["captions"]
    assert captions["grad"].startswith(f"pre-clip, last {HEALTHY_UPDATES}: min "), captions
    assert captions["kl"].startswith(f"KL, last {HEALTHY_UPDATES}: min "), captions


@pytest.mark.slow
@pytest.mark.browser
def test_healthy_and_faulted_runs_differ_as_the_thresholds_say(healthy: Shot, faulted: Shot) -> None:
    assert healthy.state["panels"]["grad"] in {"ok", "warning"}
    assert faulted.state["panels"]["grad"] == "critical" and faulted.state["text"]["grad"] == "critical"
    assert (healthy.hues["grad"], faulted.hues["grad"]) == ("green", "red")
    assert healthy.png != faulted.png


@pytest.mark.parametrize("run", ["healthy", "faulted"])
@pytest.mark.slow
@pytest.mark.browser
def test_heads_and_seeds_follow_the_snapshot(run: str, request: pytest.FixtureRequest) -> None:
    shot: Shot = request.getfixturevalue(run)
    snap = shot.document["snapshot"]
    shown_heads = {h["name"]: h for h in shot.state["heads"]}
    assert list(shown_heads) == [h["name"] for h in snap["heads"]]
    for head in snap["heads"]:
        trend = head["trend"]
        assert shown_heads[head["name"]]["trend"] == (trend["status"] if trend else "none")
        assert shown_heads[head["name"]]["arrow"] == (trend["arrow"] if trend else "")
    assert len(shot.state["seeds"]) == len(snap["seeds"]) > 0
    for shown, seed in zip(shot.state["seeds"], snap["seeds"], strict=True):
        expected = (seed["env"], seed["slot"], seed["shown"]["label"], seed["shown"]["status"])
        assert (shown["env"], shown["slot"], shown["label"], shown["status"]) == expected
        assert (int(shown["bold"]) >= 700) == (seed["exploding"] or seed["vanishing"])
        assert (shown["gain"] == "— missing") == (seed["backward_gain"] is None)


@pytest.mark.slow
@pytest.mark.browser
def test_a_group_outside_the_cv_is_shown_and_marked(browser: Chromium, policy: TinyPolicy) -> None:
    tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, groups={"value": policy.value})
    server = serve(tele, port=0)
    try:
        with tele.update() as upd:
            backward(policy)
            upd.clip_grad_norm_(0.5)
            upd.observe_kl_value(0.01)  # capture screenshots the KL panel, hidden without a KL
        shot = capture(browser, server)
    finally:
        server.close()
        tele.close()
    assert [h["kind"] for h in shot.document["snapshot"]["heads"]] == ["action", "action", "other"]
    rows = {h["name"]: (h["kind"], h["label"]) for h in shot.state["heads"]}
    assert rows == {"op": ("action", "op"), "slot": ("action", "slot"), "value": ("other", "value · not in CV")}
    assert shot.errors == []


def test_entropy_panel_and_per_head_entropy_follow_the_snapshot(healthy: Shot) -> None:
    """TELE-120 with its sparkline and TELE-121 velocity label; TELE-170 per head, in its level's status."""
    policy = healthy.document["snapshot"]["policy"]
    state = healthy.state
    assert state["panels"]["entropy"] == policy["entropy"]["shown"]["status"]
    assert state["text"]["entropy"] == policy["entropy"]["shown"]["label"]
    assert state["spark"]["entropy"] == HEALTHY_UPDATES == len(policy["entropy"]["history"])
    assert state["captions"]["entropy"].startswith(f"entropy, last {HEALTHY_UPDATES}: min ")
    assert state["text"]["velocity"].startswith(policy["entropy"]["velocity"]["shown"]["label"] + " ")
    shown = {h["name"]: h for h in state["heads"]}
    assert policy["head_entropy"], "the demo reports per-head entropy"
    for name, head in policy["head_entropy"].items():
        assert shown[name]["entropyStatus"] == head["shown"]["status"]
        assert shown[name]["entropy"] == f"{head['value']:.3f}"


@pytest.mark.slow
@pytest.mark.browser
def test_faulted_heads_trend_up_in_red(faulted: Shot) -> None:
    """TELE-321: a head above the upper context rising is drawn critical."""
    assert any(h["trend"] == "critical" and h["arrow"] == "↗" for h in faulted.state["heads"])


@pytest.mark.parametrize("run", ["healthy", "faulted"])
@pytest.mark.slow
@pytest.mark.browser
def test_page_logs_no_console_errors(run: str, request: pytest.FixtureRequest) -> None:
    shot: Shot = request.getfixturevalue(run)
    assert shot.errors == []


@pytest.mark.slow
@pytest.mark.browser
def test_a_nan_gradient_shows_as_missing_in_red(browser: Chromium) -> None:
    """NaN arrives as the string "NaN": shown as a dash, labelled NaN, critical, a gap in the sparkline."""
    with demo_run("nan", updates=2, fault_after=1) as (_, server):
        shot = capture(browser, server, full_page=False)
    assert shot.document["snapshot"]["grad_norm"]["pre"] == "NaN"
    assert shot.state["panels"]["grad"] == "critical" and shot.state["text"]["grad"] == "NaN"
    assert shot.state["values"]["grad"] == "—" and shot.hues["grad"] == "red"
    assert shot.state["spark"]["grad"] == 1
    # Where it started: the op head is non-finite from the faulted update's first step, in red.
    (op,) = [h for h in shot.state["heads"] if h["name"] == "op"]
    assert (op["state"], op["stateText"]) == ("nonfinite", "nonfinite at step 0")
    assert f"c-{shot.document['colours']['critical']}" in op["stateColour"].split()
    assert shot.errors == []


_HIDDEN_JS = "({seeds: document.getElementById('panel-seeds').hidden, kl: document.getElementById('panel-kl').hidden})"


@pytest.mark.slow
def test_empty_panels_are_hidden_until_their_signal_appears(
    browser: Chromium, server: Server, tele: Telemetry, policy: TinyPolicy
) -> None:
    """A trainer without seeds and without KL sees neither panel; each appears once its signal does."""
    with tele.update() as upd:
        backward(policy, seed=0)
        upd.clip_grad_norm_(0.5)
    tab = browser.open(server.base_url + "/")
    tab.wait_for("Number(document.body.dataset.updates) === 1", PAGE_TIMEOUT_S)
    assert tab.evaluate(_HIDDEN_JS) == {"seeds": True, "kl": True}
    seed = Gain(1.0)
    watch = tele.watch_seed(seed.lin, host=seed, env=0, slot="a")
    with tele.update() as upd:
        backward(policy, seed=1)
        upd.clip_grad_norm_(0.5)
        upd.observe_kl_value(0.01)
    tab.wait_for("Number(document.body.dataset.updates) === 2", PAGE_TIMEOUT_S)
    assert tab.evaluate(_HIDDEN_JS) == {"seeds": False, "kl": False}
    # watched without backward_gain=True: the gain is missing, never 0
    assert tab.evaluate("document.querySelector('#seed-rows tr').children[3].textContent") == "— missing"
    watch.remove()
    with tele.update():
        pass
    tab.wait_for("Number(document.body.dataset.updates) === 3", PAGE_TIMEOUT_S)
    assert tab.evaluate(_HIDDEN_JS) == {"seeds": False, "kl": False}  # a pruned seed leaves "no seeds watched"
    assert tab.errors() == []


_KL_JS = "[document.getElementById('panel-kl').dataset.status, document.getElementById('kl-label').textContent]"


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_shows_each_run_in_its_own_levels(browser: Chromium, policy: TinyPolicy) -> None:
    """A KL of 0.06 is critical on the catalog's levels and warning for a run whose critical starts at 0.1."""
    own = {"kl_divergence": {"warning": 0.05, "critical": 0.1}}
    for thresholds, status in ((None, "critical"), (own, "warning")):
        tele = Telemetry(policy, heads={"op": policy.op, "slot": policy.slot}, thresholds=thresholds)
        srv = serve(tele, port=0)
        try:
            with tele.update() as upd:
                upd.observe_kl_value(0.06)
            doc = json.loads(_get(srv, "/api/snapshot")[2])
            assert doc["metrics"]["kl_divergence"]["levels"][2]["from"] == (0.1 if thresholds else 0.03)
            tab = browser.open(srv.base_url + "/")
            tab.wait_for("Number(document.body.dataset.updates) === 1", PAGE_TIMEOUT_S)
            panel = tab.evaluate(_KL_JS)
            assert panel == [status, default_catalog()["kl_divergence"].level(status).label]
            assert tab.errors() == []
        finally:
            srv.close()
            tele.close()


# --- what the page must tell truthfully (#26) ------------------------------------------------------

# TELE-320's levels for a head's gradient norm: red < 0.01, yellow < 0.1, green <= 2.0, yellow <= 5.0, red > 5.0,
# as the catalog gives them; the page takes them from the document.
TELE_320_LEVELS = [
    ("vanishing", "[0.0, 0.01)", "critical"),
    ("low", "[0.01, 0.1)", "warning"),
    ("healthy", "[0.1, 2.0]", "ok"),
    ("high", "(2.0, 5.0]", "warning"),
    ("exploding", "(5.0, +inf]", "critical"),
]
# Gradient norms per head that fall in each of those levels, and where they must be drawn.
HEAD_NORMS = {
    "a": (0.005, "critical"),
    "b": (0.05, "warning"),
    "c": (1.0, "ok"),
    "d": (3.0, "warning"),
    "e": (3e3, "critical"),
}


def test_the_catalog_gives_head_norms_tele_320s_levels() -> None:
    levels = default_catalog()["head_grad_norm"].levels
    assert [(lv.name, str(lv.when), lv.status) for lv in levels] == TELE_320_LEVELS


class _FiveHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name in HEAD_NORMS:
            setattr(self, name, nn.Linear(2, 1, bias=False))


def test_the_header_says_what_each_number_counts(server: Server) -> None:
    html = _get(server, "/")[2].decode()
    for words in ("PPO updates published", "optimizer steps in the latest update", "updates stopped early"):
        assert words in html


def test_the_document_gives_each_head_its_level_and_the_clip_fraction_its_level() -> None:
    policy = _FiveHeads()
    tele = Telemetry(policy, heads={n: getattr(policy, n) for n in HEAD_NORMS})
    server = serve(tele, port=0)
    try:
        with tele.update() as upd:
            for name, (norm, _) in HEAD_NORMS.items():
                getattr(policy, name).weight.grad = torch.tensor([[norm, 0.0]])
            upd.observe_gradients()
            upd.observe_clip_fraction(0.27)
        snap = snapshot_document(server)["snapshot"]
    finally:
        server.close()
        tele.close()
    assert {h["name"]: h["shown"]["status"] for h in snap["heads"]} == {n: s for n, (_, s) in HEAD_NORMS.items()}
    assert snap["policy"]["clip_fraction"] == {
        "value": 0.27,
        "shown": asdict(show(default_catalog()["clip_fraction"], 0.27)),
    }


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_tells_head_levels_policy_health_flat_lines_and_seeds_without_data(
    browser: Chromium,
) -> None:
    policy = _FiveHeads()
    tele = Telemetry(
        policy,
        heads={n: getattr(policy, n) for n in HEAD_NORMS},
        action_sizes=dict.fromkeys(HEAD_NORMS, 2),
    )
    seed = Gain(1.0)
    tele.watch_seed(seed.lin, host=seed, env=0, slot="r0c0")  # never in a backward pass: no data
    server = serve(tele, port=0)
    try:
        for update in range(4):
            with tele.update() as upd:
                for name, (norm, _) in HEAD_NORMS.items():
                    getattr(policy, name).weight.grad = torch.tensor([[norm, 0.0]])
                upd.clip_grad_norm_(0.5)  # the same gradients every update: a flat pre-clip history
                heads = {n: torch.full((8,), 0.1 * (update + 1)) for n in HEAD_NORMS}
                upd.observe_ratios(heads)
                upd.observe_explained_variance(torch.arange(8.0), torch.arange(8.0) * 2)
                upd.observe_advantages(torch.linspace(-1, 1, 8))
                upd.observe_entropy({n: torch.full((8,), 0.6) for n in HEAD_NORMS})
                upd.observe_kl_value(0.01)  # capture screenshots the KL panel, hidden without a KL
                upd.observe_log_probs({n: torch.tensor([-0.5, -60.0 * (update + 1)]) for n in HEAD_NORMS})
        shot = capture(browser, server)
    finally:
        server.close()
        tele.close()
    doc = shot.document["snapshot"]
    state = shot.state
    assert shot.errors == []

    # Per-head norms in TELE-320's colours, from the document's levels.
    assert {h["name"]: h["status"] for h in state["heads"]} == {n: s for n, (_, s) in HEAD_NORMS.items()}
    colours = shot.document["colours"]
    for head in state["heads"]:
        assert f"c-{colours[HEAD_NORMS[head['name']][1]]}" in head["currentColour"].split(), head

    # A history of the same norm (float rounding apart) is drawn flat.
    assert len(doc["grad_norm"]["history"]) == 4 and state["flat"]["grad"] == "true"

    # A watched seed that had no backward pass says "no data", not a green "OK".
    (row,) = state["seeds"]
    assert (row["label"], row["status"]) == ("no data", "neutral") and doc["seeds"][0]["passes"] == 0

    # Every levelled signal with an alert has a row, in its level's words and colour.
    assert state["hidden"]["health"] is False
    rows = {(r["signal"], r["head"]): r for r in state["health"]}
    policy_doc = doc["policy"]
    expected = {
        ("clip_fraction", None): policy_doc["clip_fraction"],
        ("explained_variance", None): policy_doc["explained_variance"],
        ("advantage_std", None): policy_doc["advantage_std"],
        ("entropy_normalized", None): policy_doc["entropy"]["normalized"],
        **{("head_ratio_max", h): v for h, v in policy_doc["head_ratio_max"].items()},
        ("log_prob_min", None): policy_doc["log_prob"]["min"],
        ("log_prob_max", None): policy_doc["log_prob"]["max"],
        **{("head_clip_fraction", h): v for h, v in policy_doc["head_clip_fraction"].items()},
    }
    assert set(rows) == set(expected) and len(policy_doc["head_ratio_max"]) == len(HEAD_NORMS)
    assert len(policy_doc["head_clip_fraction"]) == len(HEAD_NORMS)
    # TELE-160's minimum, -240 after the 4th update: critical ("NaN RISK"); TELE-161's maximum -0.5: healthy.
    assert (rows[("log_prob_min", None)]["label"], rows[("log_prob_min", None)]["status"]) == ("NaN RISK", "critical")
    assert rows[("log_prob_max", None)]["status"] == "ok"
    # A per-head clip fraction has no levels: neutral. exp(0.4) leaves [0.8, 1.2] at every step: all clipped.
    for h in HEAD_NORMS:
        row = rows[("head_clip_fraction", h)]
        assert (row["value"], row["label"], row["status"]) == ("1.000", "", "neutral"), row  # the number, once
    for key, value in expected.items():
        assert value["value"] is not None, key
        label = "" if key[0] == "head_clip_fraction" else value["shown"]["label"]
        assert (rows[key]["label"], rows[key]["status"]) == (label, value["shown"]["status"]), key
    assert rows[("clip_fraction", None)]["detail"].startswith("high ")
    assert state["panels"]["health"] in {"critical", "warning", "ok"}


@pytest.mark.slow
@pytest.mark.browser
def test_the_explode_faults_page_shows_the_explosion(faulted: Shot) -> None:
    """--fault explode: the pre-clip number is critical and its sparkline, pre-clip, shows the jump."""
    snap, state = faulted.document["snapshot"], faulted.state
    assert state["panels"]["grad"] == "critical" and faulted.hues["grad"] == "red"
    assert state["overflowing"] == []  # per-head norms in the thousands still fit their table
    assert float(snap["grad_norm"]["pre"]) > 10
    history = [float(v) for v in snap["grad_norm"]["history"]]
    assert len(history) == HEALTHY_UPDATES and history[0] < 10 < history[-1]  # healthy update 1, then the fault
    assert state["flat"]["grad"] == "false" and state["captions"]["grad"].startswith("pre-clip, ")
    assert all(h["status"] == h_doc["shown"]["status"] for h, h_doc in zip(state["heads"], snap["heads"], strict=True))
    assert state["header"][1].startswith("optimizer steps in the latest update")
