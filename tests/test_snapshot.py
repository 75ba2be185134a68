"""Snapshot.to_dict (what /api/snapshot serves): layers, dead layers and update ratios, missing as null."""

from __future__ import annotations

import json
import math
from dataclasses import replace

from tele_exporter.catalog import default_catalog
from tele_exporter.snapshot import LayerState, empty_snapshot


def test_layers_serialise_with_missing_as_null_and_nan_as_a_string() -> None:
    snap = replace(
        empty_snapshot((("op", "action"),)),
        updates=1,
        layers=(
            LayerState("trunk.0", 0.25, 4, False, 0.002),
            LayerState("frozen", math.nan, 0, False, None),  # no gradient: missing, not NaN data
            LayerState("broken", math.nan, 4, False, math.nan),  # non-finite data
            LayerState("dead", 0.0, 4, True, 0.0),
        ),
        dead_layers=1,
    )
    payload = json.loads(json.dumps(snap.to_dict(default_catalog())))
    layers = {layer["name"]: layer for layer in payload["layers"]}
    assert layers["trunk.0"] == {"name": "trunk.0", "grad_norm": 0.25, "steps": 4, "dead": False, "update_ratio": 0.002}
    assert layers["frozen"]["grad_norm"] is None and layers["frozen"]["update_ratio"] is None
    assert layers["broken"]["grad_norm"] == "NaN" and layers["broken"]["update_ratio"] == "NaN"
    assert layers["dead"]["dead"] is True and payload["dead_layers"] == 1
    assert payload["dead_layers_shown"]["status"] == "warning"  # TELE-331: 1-2 dead layers
    assert payload["heads"][0]["update_ratio"] is None


def test_without_layers_the_list_is_empty_and_the_count_missing() -> None:
    payload = empty_snapshot((("op", "action"),)).to_dict(default_catalog())
    assert payload["layers"] == [] and payload["dead_layers"] is None
    assert payload["dead_layers_shown"]["status"] == "neutral"  # missing: no level
