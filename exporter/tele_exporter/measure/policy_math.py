"""Pure tensor math of the PPO policy records: KL (TELE-111) and policy health (TELE-120/121/124/130/140/151/170/200).

Per-call functions return small float64 tensors on the input's device (no host
sync); Telemetry gathers them with the rest of an update and finishes the
per-update values on the host with the `*_update` functions below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

KL_LOG_RATIO_CLAMP = 20.0
"""TELE-111: log-ratios are clamped to [-20, 20] before exp(r) - 1 - r."""
KL_WEIGHT_FLOOR = 1e-8

DEFAULT_CLIP_EPS = 0.2


def check_head_tensors(
    what: str, tensors: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None, heads: Sequence[str]
) -> None:
    """Raise an error naming the head whose tensor or mask is unknown, not a tensor or the wrong shape."""
    masks = masks or {}
    if not tensors:
        raise ValueError(f"{what} needs at least one head's tensor")
    for name in (*tensors, *masks):
        if name not in heads:
            raise ValueError(f"unknown head {name!r} in {what}; heads are {list(heads)}")
    for name in masks:
        if name not in tensors:
            raise ValueError(f"{what}: mask for head {name!r} has no tensor")
    steps: tuple[str, int] | None = None
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: head {name!r} is a {type(t).__name__}, not a tensor")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{what}: head {name!r} has dtype {t.dtype}, expected a real floating tensor")
        mask = masks.get(name)
        if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(t.shape)):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"{what}: mask of head {name!r} has shape {shape}, its tensor has shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{what}: head {name!r} has no timesteps")
        if steps is not None and t.numel() != steps[1]:
            raise ValueError(f"{what}: head {name!r} has {t.numel()} timesteps, head {steps[0]!r} has {steps[1]}")
        steps = steps or (name, t.numel())


def check_tensor(what: str, t: object, *, min_numel: int = 1) -> Tensor:
    """`t` as a tensor, or an error naming `what` when it is not a real tensor with enough elements."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} is a {type(t).__name__}, not a tensor")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what} has dtype {t.dtype}, expected a real floating tensor")
    if t.numel() < min_numel:
        raise ValueError(f"{what} has {t.numel()} elements, needs at least {min_numel}")
    return t


def _valid(t: Tensor, mask: Tensor | None) -> Tensor:
    """The float64 validity of each element (all 1 without a mask)."""
    if mask is None:
        return torch.ones(t.shape, dtype=torch.float64, device=t.device)
    return (mask.detach() != 0).to(torch.float64)


def stack_heads(tensors: Mapping[str, Tensor]) -> Tensor:
    """The heads' per-step tensors as one float64 [heads, steps] matrix: one stack (and one cast) for all heads.

    Batching the heads is what keeps a per-step observation at a fixed number of kernel
    launches whatever the number of heads; heads of different dtypes are cast one by one.
    """
    given = list(tensors.values())
    stacked = _stack_alike(given)
    if stacked is not None:
        return stacked.to(torch.float64)
    flat = [t.detach().reshape(-1) for t in given]
    if len({t.dtype for t in flat}) > 1:
        flat = [t.to(torch.float64) for t in flat]
    return torch.stack(flat).to(torch.float64)


def _stack_alike(tensors: Sequence[Tensor]) -> Tensor | None:
    """Tensors of one shape and dtype as one detached [n, elements] matrix (one stack, no per-tensor
    detach or reshape); None when they differ, for the caller's one-by-one path."""
    first = tensors[0]
    if not all(t.shape == first.shape and t.dtype == first.dtype for t in tensors):
        return None
    return torch.stack(list(tensors)).detach().reshape(len(tensors), -1)


def mask_matrix(names: Sequence[str], masks: Mapping[str, Tensor], steps: int, device: torch.device) -> Tensor | None:
    """The heads' causal masks as one bool [heads, steps] matrix (nonzero is valid); None when no head has one."""
    if not masks:
        return None
    given = [masks[name] for name in names if name in masks]
    stacked = _stack_alike(given) if len(given) == len(names) else None
    if stacked is not None:  # one stack and one comparison for every head
        return stacked if stacked.dtype == torch.bool else stacked != 0
    ones: Tensor | None = None
    rows = []
    for name in names:
        mask = masks.get(name)
        if mask is None:
            if ones is None:
                ones = torch.ones(steps, dtype=torch.bool, device=device)
            rows.append(ones)
        else:
            m = mask.detach().reshape(-1)
            rows.append(m if m.dtype == torch.bool else m != 0)
    return torch.stack(rows)


def entropy_terms(entropies: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
    """One observe_entropy call as [joint, sum_h..., n_h...] float64 on the device (TELE-120/170).

    joint = sum over heads of sum_t(mask * H_h(t)) / T: the factored policy's entropy, each
    head counted only where its causal mask lets it act. sum_h and n_h are the masked sum of
    a head's entropy and its valid steps, from which the per-head mean is taken at publish.
    Masked-out entries never contribute, even when NaN.
    """
    h = stack_heads(entropies)
    valid = mask_matrix(list(entropies), masks or {}, h.shape[1], h.device)
    if valid is None:
        sums, counts = h.sum(1), torch.full((h.shape[0],), float(h.shape[1]), dtype=torch.float64, device=h.device)
    else:
        sums, counts = torch.where(valid, h, 0.0).sum(1), valid.sum(1).to(torch.float64)
    return torch.cat([(sums.sum() / h.shape[1]).reshape(1), sums, counts])


def head_entropy_normalized(total: float, valid: float, size: int) -> float:
    """TELE-170 for one head: (total / valid) / log(n_actions); NaN (missing) with no valid step or one action."""
    if valid <= 0 or size <= 1:
        return math.nan
    return (total / valid) / math.log(size)


def entropy_velocity(history: Sequence[float]) -> float | None:
    """TELE-121: least-squares slope (nats per update) of the entropy history; None with fewer than two values."""
    n = len(history)
    if n < 2:
        return None
    x_mean = (n - 1) / 2.0
    y_mean = math.fsum(history) / n
    num = math.fsum((i - x_mean) * (y - y_mean) for i, y in enumerate(history))
    den = math.fsum((i - x_mean) ** 2 for i in range(n))
    return num / den


def explained_variance_terms(values: Tensor, returns: Tensor) -> Tensor:
    """[ev, var(returns)] float64 on the device: TELE-200's 1 - Var(returns - values) / Var(returns).

    Population variances (SB3's explained_variance); var(returns) == 0 leaves ev undefined,
    which publish reports as missing.
    """
    v = values.detach().reshape(-1).to(torch.float64)
    r = returns.detach().reshape(-1).to(torch.float64)
    var_r = r.var(correction=0)
    ev = 1.0 - (r - v).var(correction=0) / torch.where(var_r == 0, torch.ones_like(var_r), var_r)
    return torch.stack([ev, var_r])


def advantage_std(advantages: Tensor, mask: Tensor | None = None) -> Tensor:
    """[std, n_valid] float64 on the device: TELE-140's sample std (n - 1) of the valid advantages.

    Sample std, as torch's adv.std() that trainers normalise with, so a normalised batch reads 1.0.
    """
    a = advantages.detach().reshape(-1).to(torch.float64)
    m = _valid(a, None if mask is None else mask.reshape(-1))
    n = m.sum()
    kept = torch.where(m > 0, a, torch.zeros_like(a))
    mean = kept.sum() / n.clamp(min=1.0)
    dev = torch.where(m > 0, (a - mean).square(), torch.zeros_like(a))
    return torch.stack([(dev.sum() / (n - 1).clamp(min=1.0)).sqrt(), n])


def ratio_terms(
    log_ratio: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None, clip_eps: float = DEFAULT_CLIP_EPS
) -> Tensor:
    """One observe_ratios call as [cf, cf_high, cf_low, max_h..., n_h..., cf_h...] float64 on the device.

    TELE-130: r = exp(sum of the heads' masked log-ratios), the joint ratio (an inactive head's
    ratio is 1), each clamped to [-20, 20]; cf = mean(|r - 1| > eps), cf_high = mean(r > 1 + eps),
    cf_low = mean(r < 1 - eps); a NaN ratio makes them NaN. The means are over the steps where at
    least one head acts: a step that every mask leaves out (padding, such as RLlib's loss mask) has
    no action and no ratio. TELE-151: max_h is the head's largest exp(clamp(r_h, -20, 20)) over
    its valid steps, n_h their number. cf_h, the head's own clip fraction (as a per-head surrogate
    clips it), is the fraction of its valid steps with |exp(clamp(r_h, -20, 20)) - 1| > eps; NaN
    when one of them is NaN.
    """
    r = stack_heads(log_ratio).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    valid = mask_matrix(list(log_ratio), masks or {}, r.shape[1], r.device)
    if valid is None:
        joint, maxima = r.sum(0), r.amax(1).exp()
        counts = torch.full((r.shape[0],), float(r.shape[1]), dtype=torch.float64, device=r.device)
        acting = None
    else:
        joint = torch.where(valid, r, 0.0).sum(0)
        maxima = torch.where(valid, r, -math.inf).amax(1).exp()
        counts = valid.sum(1).to(torch.float64)
        acting = valid.any(0)
    outside = (r.exp() - 1.0).abs() > clip_eps  # [heads, steps]: each head's own ratio left the clip range
    broken = r.isnan() if valid is None else r.isnan() & valid
    if valid is not None:
        outside = outside & valid
    per_head = outside.sum(1, dtype=torch.float64) / counts.clamp(min=1.0)
    per_head = torch.where(broken.any(1), math.nan, per_head)
    ratio = joint.clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP).exp()
    if acting is None:
        high = (ratio > 1.0 + clip_eps).mean(dtype=torch.float64)
        low = (ratio < 1.0 - clip_eps).mean(dtype=torch.float64)
    else:  # the same float64 sum / count as mean() when every step acts
        steps = acting.sum(dtype=torch.float64).clamp(min=1.0)
        high = ((ratio > 1.0 + clip_eps) & acting).sum(dtype=torch.float64) / steps
        low = ((ratio < 1.0 - clip_eps) & acting).sum(dtype=torch.float64) / steps
    fractions = torch.stack([high + low, high, low])
    fractions = torch.where(ratio.isnan().any(), math.nan, fractions)  # a NaN ratio makes them NaN
    return torch.cat([fractions, maxima, counts, per_head])


def log_prob_terms(log_probs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
    """One observe_log_probs call as [min, max, n_valid] float64 on the device (TELE-160/161).

    Over every head's valid entries together, as the records' system takes the extremes of all
    its heads' log-probabilities at once; a NaN among them makes both NaN (amin and amax propagate
    it), a masked-out entry never counts. Heads of one shape are stacked: twelve launches a call
    whatever the number of heads.
    """
    masks = masks or {}
    names = list(log_probs)
    tensors = [log_probs[name].detach() for name in names]
    shape = tensors[0].shape
    same = all(t.shape == shape for t in tensors)
    values = (torch.stack(tensors) if same else torch.cat([t.reshape(-1) for t in tensors])).to(torch.float64)
    if not masks:
        n = torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)
        return torch.stack([values.amin(), values.amax(), n])
    if same and all(name in masks and masks[name].shape == shape for name in names):
        valid = torch.stack([masks[name].detach() for name in names]) != 0
    else:
        valid = torch.cat(
            [
                (masks[name].detach().reshape(-1) != 0)
                if name in masks
                else torch.ones(t.numel(), dtype=torch.bool, device=t.device)
                for name, t in zip(names, tensors, strict=True)
            ]
        ).reshape(values.shape)
    low = torch.where(valid, values, math.inf).amin()
    high = torch.where(valid, values, -math.inf).amax()
    return torch.stack([low, high, valid.sum(dtype=torch.float64)])


def head_kl(log_ratio: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(masked mean of exp(r) - 1 - r with r clamped to [-20, 20], number of valid steps)."""
    r = log_ratio.detach().to(torch.float64).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    kl_t = torch.expm1(r) - r
    if mask is None:
        n_valid = torch.full((), float(r.numel()), dtype=torch.float64, device=r.device)
        return kl_t.sum() / max(r.numel(), 1), n_valid
    m = mask.detach().to(torch.float64)
    n_valid = m.sum()
    return (kl_t * m).sum() / n_valid.clamp(min=1.0), n_valid


def approx_kl(log_ratio: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
    """Causally weighted approx KL over heads (TELE-111) as a 0-d float64 tensor.

    weight = n_valid / T per head; approx_kl = sum(weight * head_kl) / max(sum(weight), 1e-8).
    """
    masks = masks or {}
    if not log_ratio:
        raise ValueError("approx_kl needs at least one head's log_ratio")
    _check_kl_inputs(log_ratio, masks)
    r = stack_heads(log_ratio).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)  # [heads, steps]
    steps = r.shape[1]
    kl_t = torch.expm1(r) - r
    if not masks:  # every head valid at every step: equal weights
        return kl_t.sum(1).div(max(steps, 1)).mean()
    if all(mask.dtype == torch.bool for mask in masks.values()):
        matrix = mask_matrix(list(log_ratio), masks, steps, r.device)
        assert matrix is not None
        m = matrix.to(torch.float64)
    else:  # weights that are not 0/1 are used as they are: one stack and one cast when the masks are alike
        given = [masks[name] for name in log_ratio if name in masks]
        stacked = _stack_alike(given) if len(given) == len(log_ratio) else None
        if stacked is not None:
            m = stacked.to(torch.float64)
        else:
            m = torch.stack([_weights(masks.get(name), r) for name in log_ratio])
    n_valid = m.sum(1)
    head = (kl_t * m).sum(1) / n_valid.clamp(min=1.0)
    weight = n_valid / max(steps, 1)
    return (weight * head).sum() / weight.sum().clamp(min=KL_WEIGHT_FLOOR)


def _weights(mask: Tensor | None, r: Tensor) -> Tensor:
    """A head's per-step KL weights: its mask's values as float64 (ones without a mask)."""
    if mask is None:
        return torch.ones(r.shape[1], dtype=torch.float64, device=r.device)
    return mask.detach().reshape(-1).to(torch.float64)


def _check_kl_inputs(log_ratio: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Raise a ValueError naming the head whose inputs do not fit together."""
    for name in masks:
        if name not in log_ratio:
            raise ValueError(f"mask for head {name!r} has no log_ratio")
    steps = None
    for name, r in log_ratio.items():
        if not isinstance(r, Tensor):
            raise TypeError(f"log_ratio of head {name!r} is a {type(r).__name__}, not a tensor")
        mask = masks.get(name)
        if mask is not None and tuple(mask.shape) != tuple(r.shape):
            raise ValueError(
                f"mask of head {name!r} has shape {tuple(mask.shape)}, its log_ratio has shape {tuple(r.shape)}"
            )
        if steps is not None and r.numel() != steps[1]:
            raise ValueError(f"head {name!r} has {r.numel()} timesteps, head {steps[0]!r} has {steps[1]}")
        steps = steps or (name, r.numel())
