"""Gradient-norm math of the TELE records (TELE-310/320/330/557): no hooks, no Prometheus, no host syncs.

Every function returns tensors on the input's device (or plain floats where the
input is host data) so that the training thread never waits on the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils._foreach_utils import _device_has_foreach_support, _has_foreach_support

CLIP_EPS = 1e-6
CV_MEAN_FLOOR = 1e-8
SEED_NORM_FLOOR = 1e-8


def index_tensor(values: Sequence[int], device: torch.device) -> Tensor:
    """A long tensor on `device` without a blocking host-to-device copy (pinned, non_blocking on CUDA)."""
    return host_tensor(values, torch.long, device)


def host_tensor(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host values as a tensor on `device` without a blocking copy: pinned and non_blocking on CUDA."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-tensor norms in the gradient's own precision, but never below float32.

    Half-precision squares overflow at 256, so fp16/bf16 norms are taken in
    float32. float32 is what torch's clip_grad_norm_ itself uses per tensor, and
    an upcast to float64 inside _foreach_norm costs ~2.7x on CPU; the sums across
    tensors and heads, where float32 would overflow, are float64 (see callers).
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def tensor_norm(tensor: Tensor) -> Tensor:
    """L2 norm of one tensor as a 0-d tensor in its own precision (see _norm_dtype), outside autograd.

    One kernel and no upcast: a hook calls this for every gradient of a backward
    pass, so the float64 conversion waits for `stack_float64` over the whole pass.
    """
    if tensor.requires_grad:  # a gradient under create_graph=True
        tensor = tensor.detach()
    norm: Tensor = torch.linalg.vector_norm(tensor, dtype=norm_dtype(tensor.dtype))
    return norm


def stack_float64(values: Sequence[Tensor]) -> Tensor:
    """0-d tensors as one float64 vector on the first one's device: one stack, a copy only for another device."""
    device = values[0].device
    if any(v.device != device for v in values):
        values = [v.to(device) for v in values]
    return torch.stack(list(values)).to(torch.float64)


def _by_device_and_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of the tensors per (device, dtype): the groups one fused `_foreach_norm` can take."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def tensor_norm_list(tensors: Sequence[Tensor]) -> list[Tensor]:
    """L2 norm of each tensor as a 0-d tensor in its own precision (see _norm_dtype), in input order.

    One fused `_foreach_norm` per device and dtype, and nothing else: the backward-pass
    callback of the seed probe calls this, and every further op there costs ~10-30 us
    of cold code on CPU, so stacking and the float64 sums wait for the probe's fold.
    """
    groups = _by_device_and_dtype(tensors)
    if len(groups) == 1:
        ((_, dtype),) = groups
        return list(torch._foreach_norm(list(tensors), 2, dtype=norm_dtype(dtype)))
    out: list[Tensor] = list(tensors)
    for (_, dtype), idx in groups.items():
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=norm_dtype(dtype))
        for i, norm in zip(idx, norms, strict=True):
            out[i] = norm
    return out


class ForeachUnsupportedError(RuntimeError):
    """foreach=True on a device without foreach kernels: torch's clip raises the same message."""


def use_foreach(tensors: Sequence[Tensor], device: torch.device, foreach: bool | None) -> bool:
    """Whether to take the fused foreach kernels, decided as torch.nn.utils.clip_grad_norm_ decides.

    None: foreach where the device and every tensor support it, else one kernel per
    tensor; True: foreach, and a device without it raises; False: one kernel per tensor.
    """
    if foreach is None:
        return _has_foreach_support(list(tensors), device)
    if foreach and not _device_has_foreach_support(device):
        raise ForeachUnsupportedError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return bool(foreach)


def _group_norms(tensors: list[Tensor], dtype: torch.dtype, foreach: bool | None) -> list[Tensor]:
    """Per-tensor L2 norms of one device and dtype: one fused kernel, or one each where foreach is off."""
    if use_foreach(tensors, tensors[0].device, foreach):
        return list(torch._foreach_norm(tensors, 2, dtype=norm_dtype(dtype)))
    return [torch.linalg.vector_norm(t, dtype=norm_dtype(dtype)) for t in tensors]


def tensor_norms(tensors: Sequence[Tensor], foreach: bool | None = None) -> Tensor:
    """L2 norm of each tensor as one float64 vector, from fused foreach kernels per device and dtype.

    `foreach` as torch's clip takes it (see use_foreach).
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    first = tensors[0].device
    groups = _by_device_and_dtype(tensors)
    if len(groups) == 1:
        ((_, dtype),) = groups
        return torch.stack(_group_norms(list(tensors), dtype, foreach)).to(torch.float64)
    out = torch.empty(len(tensors), dtype=torch.float64, device=first)
    for (_, dtype), idx in groups.items():
        norms = _group_norms([tensors[i] for i in idx], dtype, foreach)
        out[index_tensor(idx, first)] = torch.stack(norms).to(device=first, dtype=torch.float64)
    return out


def grad_norms(groups: Mapping[str, Iterable[Tensor | None]]) -> dict[str, Tensor]:
    """L2 norm (float64) of all gradients of each group; NaN for a group without any."""
    names = list(groups)
    members = [[g for g in groups[n] if g is not None] for n in names]
    flat = [g for grads in members for g in grads]
    if not flat:
        return {n: torch.tensor(math.nan, dtype=torch.float64) for n in names}
    norms = tensor_norms(flat)
    out: dict[str, Tensor] = {}
    start = 0
    for name, grads in zip(names, members, strict=True):
        stop = start + len(grads)
        if grads:
            out[name] = torch.linalg.vector_norm(norms[start:stop])
        else:
            out[name] = torch.full((), math.nan, dtype=torch.float64, device=norms.device)
        start = stop
    return out


def gradient_cv(norms: Iterable[float | Tensor | None]) -> float:
    """One optimizer step's coefficient of variation, sample std / max(|mean|, 1e-8), of its head norms (TELE-330).

    None marks a head without gradient data that step and is left out; NaN or Inf
    (non-finite gradients) make the CV NaN; 0.0 when fewer than two heads remain or all are zero.
    """
    values = [float(v) for v in norms if v is not None]
    n = len(values)
    if any(not math.isfinite(v) for v in values):
        return math.nan
    if n <= 1 or all(v == 0.0 for v in values):
        return 0.0
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var) / max(abs(mean), CV_MEAN_FLOOR)


def step_cvs(norms: Tensor, present: Tensor) -> Tensor:
    """gradient_cv of every step at once: norms [S, H] float64, present [S, H] bool; returns [S] (host math)."""
    norms = norms.to(torch.float64)
    n = present.sum(dim=1)
    values = torch.where(present, norms, torch.zeros_like(norms))
    mean = values.sum(dim=1) / n.clamp(min=1)
    var = torch.where(present, (norms - mean[:, None]).square(), torch.zeros_like(norms)).sum(dim=1)
    cv = (var / (n - 1).clamp(min=1)).sqrt() / mean.abs().clamp(min=CV_MEAN_FLOOR)
    trivial = (n <= 1) | (values == 0).all(dim=1)
    nonfinite = (present & ~torch.isfinite(norms)).any(dim=1)
    cv = torch.where(trivial, torch.zeros_like(cv), cv)
    return torch.where(nonfinite, torch.full_like(cv, math.nan), cv)


def seed_rms_ratio(
    seed_norm: Tensor | float, seed_numel: Tensor | int, host_norm: Tensor | float, host_numel: Tensor | int
) -> Tensor:
    """TELE-557: seed parameter-gradient RMS over its host's, (|g_s|/sqrt(n_s)) / (|g_h|/sqrt(n_h) + 1e-8).

    0.0 (no gradient data) where either norm is below 1e-8; NaN or Inf norms
    propagate, and a non-finite ratio is exploding. Works elementwise over passes.
    """
    s_norm = torch.as_tensor(seed_norm, dtype=torch.float64)
    h_norm = torch.as_tensor(host_norm, dtype=torch.float64, device=s_norm.device)
    s_n = torch.as_tensor(seed_numel, dtype=torch.float64, device=s_norm.device).clamp(min=1)
    h_n = torch.as_tensor(host_numel, dtype=torch.float64, device=s_norm.device).clamp(min=1)
    ratio = (s_norm / s_n.sqrt()) / (h_norm / h_n.sqrt() + SEED_NORM_FLOOR)
    no_data = (s_norm < SEED_NORM_FLOOR) | (h_norm < SEED_NORM_FLOOR)
    return torch.where(no_data, torch.zeros_like(ratio), ratio)


def backward_gain(grad_in_norm: Tensor | float, grad_out_norm: Tensor | float) -> Tensor:
    """A seed's backward gain |dL/d input| / |dL/d output|; 0.0 (no data) when the output grad is 0.

    Non-finite norms propagate as NaN or Inf: they are data to report.
    """
    g_in = torch.as_tensor(grad_in_norm, dtype=torch.float64)
    g_out = torch.as_tensor(grad_out_norm, dtype=torch.float64, device=g_in.device)
    safe = torch.where(g_out == 0, torch.ones_like(g_out), g_out)
    return torch.where(g_out == 0, torch.zeros_like(g_in), g_in / safe)


# The first version's name for backward_gain, kept for the public stats API; TELE-557's ratio is seed_rms_ratio.
seed_grad_ratio = backward_gain


def post_clip_norm(pre: Tensor, max_norm: float) -> Tensor:
    """The norm clip_grad_norm_ leaves: pre * min(1, max_norm / (pre + 1e-6))."""
    return pre * clip_coefficient(pre, max_norm)


def clip_coefficient(pre: Tensor, max_norm: float | Tensor) -> Tensor:
    """The factor clip_grad_norm_ multiplies gradients by: min(1, max_norm / (pre + 1e-6))."""
    return (max_norm / (pre + CLIP_EPS)).clamp(max=1.0)
