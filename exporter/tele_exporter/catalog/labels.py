"""Label names as Prometheus accepts them, checked once with an error that names the label.

A name Prometheus would refuse (or two names that clash) marks the whole target
down on every scrape, so it must fail where it is configured, not at scrape time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Labels that Prometheus, the scrape config or the exposition format itself attach.
RESERVED_LABELS = frozenset({"job", "instance", "pod", "namespace", "le", "quantile"})
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

GRADIENT_STATES = ("finite", "missing", "nonfinite", "not_learnable")
"""The values of tele_head_gradient_state's `state` label: a head's gradient in an update (the records' system's)."""


def label_name_problem(name: object) -> str | None:
    """Why `name` cannot be a label name, or None when Prometheus accepts it."""
    if not isinstance(name, str):
        return f"label {name!r} is a {type(name).__name__}, not a string"
    if not _LABEL_RE.fullmatch(name):
        return f"label {name!r} is not a label name ([a-zA-Z_][a-zA-Z0-9_]*)"
    if name.startswith("__"):
        return f"label {name!r} starts with '__', which Prometheus reserves for itself"
    if name in RESERVED_LABELS:
        return f"label {name!r} is reserved ({', '.join(sorted(RESERVED_LABELS))})"
    return None


def check_label_names(names: Iterable[object], taken: Iterable[str] = (), taken_by: str = "") -> None:
    """Raise ValueError naming the first label that is invalid, repeated, or in `taken` (used by `taken_by`)."""
    seen: set[str] = set()
    used = set(taken)
    for name in names:
        problem = label_name_problem(name)
        if problem is not None:
            raise ValueError(problem)
        assert isinstance(name, str)
        if name in seen:
            raise ValueError(f"label {name!r} is given twice")
        if name in used:
            raise ValueError(f"label {name!r} clashes with a label of {taken_by or 'another metric'}")
        seen.add(name)
