"""What Telemetry measures per layer: every module that owns parameters, or the user's own grouping, capped.

A layer is measured like a head (its gradient norm comes from the per-tensor norms the
clip computes anyway), so layers cost no launch per step; what they cost is series, one
`layer` label value each, so their number is capped and a policy over the cap is refused
at construction, naming the count, the cap and how to group.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .heads import Head

LAYER = "layer"
"""kind of a layer group: measured and exported per layer, never in the CV."""
DEFAULT_MAX_LAYERS = 128
"""The default cap on `tele_layer_*` series per run (one per layer)."""
ROOT = "(root)"
"""The layer name of parameters the policy module owns itself (e.g. a Gaussian policy's log_std)."""

LayersSpec = bool | Mapping[str, nn.Module] | None
"""True: every module that owns parameters, by module path; a mapping: name -> module; None/False: no layers."""


def resolve_layers(policy: nn.Module, layers: LayersSpec, max_layers: int) -> list[Head]:
    """The layers to measure, in module order; raises naming the count and the cap when there are too many.

    layers=True takes every module that owns parameters directly (a leaf such as nn.Linear,
    or a module with its own nn.Parameter), named by its path in `policy` ("(root)" for the
    policy's own), each with the parameters it owns; a parameter shared by two modules
    counts in the first only. A mapping names each layer's module, all its parameters.
    """
    if layers is None or layers is False:
        return []
    if isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 1:
        raise ValueError(f"max_layers must be a positive int, got {max_layers!r}")
    out: list[Head] = []
    if layers is True:
        seen: set[int] = set()
        for path, module in policy.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
            if own:
                seen.update(id(p) for p in own)
                out.append(Head(path or ROOT, LAYER, tuple(own)))
        how = "layers=True found"
    elif isinstance(layers, Mapping):
        for name, module in layers.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"layer names must be non-empty strings, got {name!r}")
            if not isinstance(module, nn.Module):
                raise TypeError(f"layer {name!r} is a {type(module).__name__}, not an nn.Module")
            out.append(Head(name, LAYER, tuple(dict.fromkeys(module.parameters()))))
        how = "layers= names"
    else:
        raise TypeError(
            f"layers must be True, False, None or a mapping of name to nn.Module, got {type(layers).__name__}"
        )
    if len(out) > max_layers:
        raise ValueError(
            f"{how} {len(out)} layers, over the cap of {max_layers} series per run (max_layers): "
            "group them with layers={name: module} (e.g. one entry per block, "
            '{"trunk": policy.trunk, "actor": policy.actor}), or raise max_layers if your Prometheus '
            f"can take {len(out)} series of each tele_layer_* metric per run"
        )
    return out
