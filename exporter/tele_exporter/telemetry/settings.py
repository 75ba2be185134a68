"""Checking a Telemetry's settings once, at construction: heads against the policy, const labels, the switch."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

from ..catalog import Catalog
from ..catalog.labels import check_label_names
from ..measure.heads import Head, HeadSpec, resolve_heads
from ..measure.layers import LayersSpec, resolve_layers
from ..measure.sharding import refuse_legacy_fsdp, refuse_sharded_rows

log = logging.getLogger("tele_exporter")

DISABLED_ENV = "TELE_EXPORTER_DISABLED"


def enabled(explicit: bool | None) -> bool:
    """An explicit `enabled` wins; else telemetry is on unless TELE_EXPORTER_DISABLED is set to anything but 0 or ''."""
    if explicit is not None:
        return bool(explicit)
    return os.environ.get(DISABLED_ENV, "").strip() in ("", "0")


def policy_heads(
    policy: nn.Module, heads: Mapping[str, HeadSpec], groups: Mapping[str, HeadSpec] | None
) -> tuple[list[nn.Parameter], list[Head]]:
    """The policy's parameters (the global norm's scope) and its resolved heads, each checked to belong to it."""
    if not isinstance(policy, nn.Module):
        raise TypeError(f"Telemetry needs the policy as an nn.Module, got {type(policy).__name__}")
    resolved = resolve_heads(heads, groups)
    params = list(dict.fromkeys(policy.parameters()))
    refuse_legacy_fsdp(params, policy)
    owned = {id(p) for p in params}
    for head in resolved:
        if any(id(p) not in owned for p in head.params):
            raise ValueError(f"head {head.name!r} has parameters that are not part of the policy")
        if not head.params:
            log.warning("head %r has no parameters: its gradient norm will always be missing", head.name)
        if head.rows is not None:
            for p in head.params:
                refuse_sharded_rows(p, [head.name])
    return params, resolved


def policy_layers(policy: nn.Module, layers: LayersSpec, max_layers: int, params: list[nn.Parameter]) -> list[Head]:
    """The layers Telemetry(layers=...) measures, each checked to belong to the policy and named once."""
    resolved = resolve_layers(policy, layers, max_layers)
    owned = {id(p) for p in params}
    names: set[str] = set()
    for layer in resolved:
        if layer.name in names:
            raise ValueError(f"layer {layer.name!r} is named twice")
        names.add(layer.name)
        if any(id(p) not in owned for p in layer.params):
            raise ValueError(f"layer {layer.name!r} has parameters that are not part of the policy")
        if not layer.params:
            log.warning("layer %r has no parameters: its gradient norm will always be missing", layer.name)
    return resolved


def distributed_rank() -> int | None:
    """This process's rank under torch.distributed with more than one process, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return int(dist.get_rank())
    return None


def const_labels(labels: Mapping[str, str] | None, catalog: Catalog) -> dict[str, str]:
    """The labels on every series: the caller's, plus `rank` under torch.distributed; names checked."""
    out = {str(k): str(v) for k, v in (labels or {}).items()}
    rank = distributed_rank()
    if rank is not None:
        out.setdefault("rank", str(rank))
    try:
        check_label_names(out, {label for spec in catalog for label in spec.labels}, "a catalog metric")
    except ValueError as exc:
        raise ValueError(f"const {exc}") from None
    return out
