"""The /api/snapshot document (version 1) the landing page reads, as a plain dict.

Built apart from its route, so the document's shape is defined once and testable without HTTP.
"""

from __future__ import annotations

import math
from typing import Any

from ..catalog.model import Level
from .source import SnapshotSource


def snapshot_document(source: SnapshotSource) -> dict[str, Any]:
    """The /api/snapshot document: the latest snapshot with display fields, and catalog facts.

    Version 1. Values that are NaN or Inf are the strings "NaN"/"Inf"; statuses are
    ok, warning, critical or neutral, and `colours` maps them to colour names.
    """
    catalog = source.catalog
    return {
        "version": 1,
        "colours": dict(catalog.colours),
        "metrics": {
            spec.id: {
                "name": spec.name,
                "tele": list(spec.tele),
                "question": spec.question,
                "precision": spec.precision,
                # This run's levels: the catalog's, or where Telemetry(thresholds=...) moved them.
                **({"levels": [_level(level) for level in spec.levels]} if spec.levels else {}),
            }
            for spec in catalog
            if spec.type != "histogram"
        },
        "snapshot": source.snapshot().to_dict(catalog),
    }


def _level(level: Level) -> dict[str, Any]:
    """A level as the document gives it: interval bounds (null for -inf and +inf) and which ends are included."""
    iv = level.when
    return {
        "name": level.name,
        "status": level.status,
        "from": iv.low if math.isfinite(iv.low) else None,
        "from_included": iv.low_closed,
        "to": iv.high if math.isfinite(iv.high) else None,
        "to_included": iv.high_closed,
    }
