"""The spec: the catalog's model and loading, per-run thresholds, display rules, label names, safe YAML.

Pure Python and PyYAML: neither torch nor prometheus_client (an import-linter contract keeps it so),
so the rule and dashboard generators and any tool can read the spec without a training stack.
"""

from .model import (
    SEVERITIES,
    Catalog,
    CatalogError,
    Interval,
    Level,
    MetricAlert,
    MetricSpec,
    Trend,
    default_catalog,
    duration_seconds,
    load_catalog,
)
from .thresholds import THRESHOLD_METRIC, Thresholds, ThresholdsError

__all__ = [
    "SEVERITIES",
    "THRESHOLD_METRIC",
    "Catalog",
    "CatalogError",
    "Interval",
    "Level",
    "MetricAlert",
    "MetricSpec",
    "Thresholds",
    "ThresholdsError",
    "Trend",
    "default_catalog",
    "duration_seconds",
    "load_catalog",
]
