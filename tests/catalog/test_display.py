"""display: TELE-321 trend arrows and colours, level labels, history trends, sparklines."""

from __future__ import annotations

import math

import pytest

from tele_exporter.catalog import default_catalog
from tele_exporter.catalog.display import head_trend, history_trend, show, sparkline

PREV = default_catalog()["head_grad_norm_prev"]


@pytest.mark.parametrize(
    ("current", "prev", "arrow", "status"),
    [
        (0.05, 0.045, "→", "neutral"),  # |delta| < 0.01: stable
        (0.05, 0.0, "↗", "ok"),  # low gradients rising: good (first update, prev 0.0)
        (0.05, 0.09, "↘", "critical"),  # low gradients falling: bad
        (1.0, 0.5, "↗", "neutral"),  # normal range: neutral
        (1.0, 1.5, "↘", "neutral"),
        (3.0, 2.5, "↗", "critical"),  # high gradients rising: bad
        (3.0, 3.5, "↘", "ok"),  # high gradients falling: good
        (2.0, 1.0, "↗", "neutral"),  # 2.0 is not > 2.0
        (0.1, 0.2, "↘", "neutral"),  # 0.1 is not < 0.1
        (1.0, 0.99, "↗", "neutral"),  # delta exactly 0.01 is not stable
    ],
)
def test_head_trend_follows_tele_321(current: float, prev: float, arrow: str, status: str) -> None:
    got = head_trend(PREV, current, prev)
    assert got is not None
    assert (got.arrow, got.status) == (arrow, status)


def test_head_trend_missing_value_has_no_arrow() -> None:
    assert head_trend(PREV, math.nan, 1.0) is None
    assert head_trend(PREV, 1.0, math.inf) is None


def test_show_uses_catalog_labels() -> None:
    c = default_catalog()
    assert show(c["gradient_cv"], 0.49).label == "stable"
    assert show(c["gradient_cv"], 2.0).label == "BAD"
    no_data = show(c["seed_grad_ratio"], 0.0)  # TELE-557's "no gradient data", uncoloured: not a green "OK"
    assert (no_data.label, no_data.status) == ("no data", "neutral")
    assert show(c["seed_grad_ratio"], 0.854).label == "ratio=0.85"
    assert show(c["seed_grad_ratio"], 0.2).label == "▼ VANISHING"
    assert show(c["seed_grad_ratio"], math.inf).label == "▲ EXPLODING"
    nan = show(c["kl_divergence"], math.nan)
    assert (nan.label, nan.status, nan.level) == ("NaN", "critical", None)


def test_history_trend() -> None:
    kl = default_catalog()["kl_divergence"]
    assert history_trend(kl, [0.01]) is None
    assert history_trend(kl, [0.01, 0.0102]).arrow == "→"  # type: ignore[union-attr]
    rising = history_trend(kl, [0.01, 0.02])
    assert rising is not None and (rising.arrow, rising.status) == ("↑", "warning")
    assert history_trend(kl, [0.04, 0.01]).arrow == "↓"  # type: ignore[union-attr]


def test_sparkline_is_one_char_per_value() -> None:
    assert sparkline([0.0, 1.0]) == "▁█"
    assert sparkline([1.0, math.nan, 1.0]) == "▁ ▁"
    assert len(sparkline([float(i) for i in range(10)])) == 10
