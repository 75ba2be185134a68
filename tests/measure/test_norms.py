"""stats: every formula against hand-computed values, numpy and torch references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tele_exporter.stats import (
    approx_kl,
    clip_coefficient,
    grad_norms,
    gradient_cv,
    post_clip_norm,
    seed_grad_ratio,
    seed_rms_ratio,
    step_cvs,
    tensor_norm_list,
    tensor_norms,
)


def test_grad_norms_match_hand_computed_values() -> None:
    norms = grad_norms({"a": [torch.tensor([3.0, 4.0])], "b": [torch.tensor([1.0]), torch.tensor([2.0, 2.0])]})
    assert norms["a"].item() == 5.0
    assert norms["b"].item() == pytest.approx(3.0, rel=1e-7)  # per-tensor norms in float32
    assert norms["a"].dtype == torch.float64


def test_grad_norms_match_numpy_and_torch_clip_total() -> None:
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(64, 32, generator=gen), torch.randn(32, generator=gen), torch.randn(7, generator=gen)]
    ours = grad_norms({"all": grads})["all"].item()
    reference = np.sqrt(sum(float((g.double().numpy() ** 2).sum()) for g in grads))
    assert ours == pytest.approx(reference, rel=1e-6)  # float32 per tensor, as torch's clip
    params = [torch.nn.Parameter(g.clone()) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    assert ours == pytest.approx(torch.nn.utils.clip_grad_norm_(params, 1e9).item(), rel=1e-6)


def test_sums_across_tensors_are_float64_and_do_not_overflow() -> None:
    """Two float32 tensors of norm 1e30: their squares overflow float32, so torch's clip says inf."""
    grads = [torch.tensor([1e30]), torch.tensor([1e30])]
    ours = grad_norms({"h": grads})["h"]
    assert ours.dtype == torch.float64
    assert ours.item() == pytest.approx(math.sqrt(2.0) * 1e30, rel=1e-6)
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    assert math.isinf(torch.nn.utils.clip_grad_norm_(params, 1.0).item())


def test_half_precision_gradients_are_normed_in_float32() -> None:
    """fp16 squares overflow past 256; a norm of 300 must still come out finite."""
    for dtype in (torch.float16, torch.bfloat16):
        norm = grad_norms({"h": [torch.full((4,), 150.0, dtype=dtype)]})["h"].item()
        assert norm == pytest.approx(300.0, rel=1e-2), dtype


def test_mixed_dtypes_and_float64_gradients() -> None:
    grads = [torch.tensor([3.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float16)]
    assert tensor_norms(grads).tolist() == [3.0, 4.0]
    assert grad_norms({"h": grads})["h"].item() == 5.0


def test_head_without_gradients_is_nan_not_zero() -> None:
    norms = grad_norms({"empty": [], "none": [None], "real": [torch.zeros(3)]})
    assert math.isnan(norms["empty"].item())
    assert math.isnan(norms["none"].item())
    assert norms["real"].item() == 0.0


def test_nonfinite_gradients_are_reported_not_raised() -> None:
    norms = grad_norms({"nan": [torch.tensor([float("nan"), 1.0])], "inf": [torch.tensor([float("inf")])]})
    assert math.isnan(norms["nan"].item())
    assert math.isinf(norms["inf"].item())


def test_tensor_norms_one_per_tensor() -> None:
    out = tensor_norms([torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])])
    assert out.tolist() == [5.0, 1.0]
    assert tensor_norms([]).numel() == 0


def test_tensor_norm_list_keeps_input_order_and_each_gradients_precision() -> None:
    """Mixed dtypes: one fused call per dtype, results back in input order; float16 is normed in float32."""
    gen = torch.Generator().manual_seed(3)
    grads = [
        torch.randn(70, generator=gen),
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
        torch.full((4,), 200.0, dtype=torch.float16),  # squares overflow float16: 400 is right
        torch.randn(9, generator=gen),
    ]
    out = tensor_norm_list(grads)
    assert [n.dtype for n in out] == [torch.float32, torch.float64, torch.float32, torch.float32]
    expected = [float(np.sqrt(np.sum(g.double().numpy() ** 2))) for g in grads]
    assert [float(n) for n in out] == pytest.approx(expected, rel=1e-6)
    assert float(out[2]) == 400.0
    assert tensor_norm_list([]) == []
    same = tensor_norm_list(grads[:1] + grads[3:])
    assert [float(n) for n in same] == pytest.approx([expected[0], expected[3]], rel=1e-6)


@pytest.mark.parametrize(
    ("norms", "expected"),
    [
        ([1.0, 1.0, 1.0], 0.0),
        ([1.0, 3.0], math.sqrt(2.0) / 2.0),  # std (n-1) = sqrt(2), mean 2
        ([2.0], 0.0),  # a single head
        ([], 0.0),
        ([0.0, 0.0, 0.0], 0.0),  # all norms zero
        ([None, 1.0, 3.0], math.sqrt(2.0) / 2.0),  # a head without gradient is left out
        ([None, 1.0], 0.0),  # one head left with data
    ],
)
def test_gradient_cv_hand_computed(norms: list[float | None], expected: float) -> None:
    assert gradient_cv(norms) == pytest.approx(expected)


def test_gradient_cv_matches_numpy_sample_std() -> None:
    values = np.random.default_rng(3).gamma(2.0, size=8)
    expected = values.std(ddof=1) / abs(values.mean())
    assert gradient_cv(values.tolist()) == pytest.approx(expected, rel=1e-12)
    assert gradient_cv(torch.tensor(values)) == pytest.approx(expected, rel=1e-12)


def test_gradient_cv_mean_floor_and_inf() -> None:
    assert gradient_cv([1e-12, 0.0]) == pytest.approx(np.std([1e-12, 0.0], ddof=1) / 1e-8)
    assert math.isnan(gradient_cv([float("inf"), 1.0]))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_head_makes_the_step_cv_nan_and_missing_is_left_out(bad: float) -> None:
    """NaN and Inf agree (both non-finite data); only a missing head (None) is left out (issue 11, bug 2)."""
    assert math.isnan(gradient_cv([bad, 0.17, 0.25]))
    assert math.isnan(gradient_cv([bad, 0.0]))  # not 0.0 for "all zero"
    assert gradient_cv([None, 0.17, 0.25]) == pytest.approx(np.std([0.17, 0.25], ddof=1) / 0.21, rel=1e-12)
    assert gradient_cv([None, 0.17]) == 0.0


def _cv_reference(row: np.ndarray, present: np.ndarray) -> float:
    """The TELE records' formula in float64 numpy, written from the formula."""
    values = row[present]
    if not np.all(np.isfinite(values)):
        return math.nan
    if values.size <= 1 or np.all(values == 0):
        return 0.0
    return float(np.std(values, ddof=1) / max(abs(np.mean(values)), 1e-8))


def test_step_cvs_match_a_float64_reference_with_missing_nan_and_inf() -> None:
    rng = np.random.default_rng(11)
    norms = rng.lognormal(-1.0, 1.5, size=(400, 6))
    norms[rng.random(norms.shape) < 0.05] = np.nan
    norms[rng.random(norms.shape) < 0.03] = np.inf
    norms[rng.random(norms.shape) < 0.05] = 0.0
    norms[::17] = 0.0
    present = rng.random(norms.shape) > 0.25
    got = step_cvs(torch.from_numpy(norms), torch.from_numpy(present)).numpy()
    expected = np.array([_cv_reference(r, p) for r, p in zip(norms, present, strict=True)])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert np.isnan(expected).any() and (expected == 0).any() and (expected > 0).any()
    for r, p, cv in zip(norms, present, got, strict=True):
        same = gradient_cv([float(v) if has else None for v, has in zip(r, p, strict=True)])
        assert same == pytest.approx(cv, rel=1e-12, nan_ok=True)


def test_the_mean_of_per_step_cvs_is_not_the_cv_of_means() -> None:
    """(1, 3) then (3, 1): per-step CVs 0.707 and 0.707, mean 0.707 ("warn"); the CV of the means is 0."""
    cvs = step_cvs(torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=torch.float64), torch.ones(2, 2, dtype=torch.bool))
    assert cvs.tolist() == [math.sqrt(2.0) / 2.0] * 2
    assert gradient_cv([2.0, 2.0]) == 0.0


@pytest.mark.parametrize(
    ("seed", "n_seed", "host", "n_host", "expected"),
    [
        (2.0, 4, 3.0, 9, (2.0 / 2.0) / (3.0 / 3.0 + 1e-8)),
        (1e-9, 4, 3.0, 9, 0.0),  # the seed's norm below 1e-8: no data
        (2.0, 4, 1e-9, 9, 0.0),  # the host's norm below 1e-8: no data
        (0.0, 4, 0.0, 9, 0.0),
    ],
)
def test_seed_rms_ratio(seed: float, n_seed: int, host: float, n_host: int, expected: float) -> None:
    assert seed_rms_ratio(seed, n_seed, host, n_host).item() == pytest.approx(expected, rel=1e-15)


def test_seed_rms_ratio_nonfinite_is_data() -> None:
    assert math.isinf(seed_rms_ratio(math.inf, 4, 1.0, 4).item())
    assert math.isnan(seed_rms_ratio(math.nan, 4, 1.0, 4).item())
    assert math.isnan(seed_rms_ratio(1.0, 4, math.nan, 4).item())


def _kl_reference(log_ratio: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> float:
    """TELE-111 written out with numpy, independently of the torch code."""
    num = den = 0.0
    for name, r in log_ratio.items():
        r = np.clip(r.astype(np.float64), -20, 20)
        mask = masks.get(name, np.ones_like(r)).astype(np.float64)
        n_valid = mask.sum()
        head = ((np.exp(r) - 1 - r) * mask).sum() / max(n_valid, 1)
        weight = n_valid / r.size
        num += weight * head
        den += weight
    return num / max(den, 1e-8)


def test_approx_kl_matches_numpy_reference_with_causal_masks() -> None:
    rng = np.random.default_rng(7)
    lr = {h: rng.normal(0, 0.2, size=64) for h in ("op", "slot", "tempo")}
    masks = {"slot": rng.random(64) > 0.3, "tempo": rng.random(64) > 0.8}
    ours = approx_kl({h: torch.tensor(v) for h, v in lr.items()}, {h: torch.tensor(m) for h, m in masks.items()})
    assert ours.item() == pytest.approx(_kl_reference(lr, masks), rel=1e-12)


def test_approx_kl_hand_computed() -> None:
    r = math.log(2.0)  # exp(r) - 1 - r = 1 - ln 2
    kl = approx_kl({"op": torch.tensor([r, r]), "slot": torch.tensor([r, 0.0])}, {"slot": torch.tensor([True, False])})
    # op: head_kl = 1 - ln2, weight 1; slot: head_kl = 1 - ln2 (one valid step), weight 1/2
    assert kl.item() == pytest.approx(1.0 - math.log(2.0))


def test_approx_kl_clamps_log_ratio() -> None:
    huge = approx_kl({"op": torch.tensor([1000.0])}).item()
    assert huge == pytest.approx(math.exp(20.0) - 1 - 20.0)
    assert math.isfinite(approx_kl({"op": torch.tensor([-1000.0])}).item())


def test_approx_kl_all_masked_is_zero() -> None:
    kl = approx_kl({"op": torch.ones(5), "slot": torch.ones(5)}, {"op": torch.zeros(5), "slot": torch.zeros(5)})
    assert kl.item() == 0.0


def test_approx_kl_nan_is_data() -> None:
    assert math.isnan(approx_kl({"op": torch.tensor([float("nan"), 0.1])}).item())


def test_approx_kl_rejects_mismatched_mask_naming_the_head() -> None:
    with pytest.raises(ValueError, match="'slot'.*\\(3,\\).*\\(4,\\)"):
        approx_kl({"slot": torch.zeros(4)}, {"slot": torch.zeros(3)})
    with pytest.raises(ValueError, match="'blueprint'"):
        approx_kl({"op": torch.zeros(4)}, {"blueprint": torch.zeros(4)})
    with pytest.raises(ValueError, match="'slot' has 3 timesteps"):
        approx_kl({"op": torch.zeros(4), "slot": torch.zeros(3)})


@pytest.mark.parametrize(
    ("g_in", "g_out", "expected"),
    [(2.0, 1.0, 2.0), (0.5, 1.0, 0.5), (3.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.0)],
)
def test_seed_grad_ratio(g_in: float, g_out: float, expected: float) -> None:
    assert seed_grad_ratio(g_in, g_out).item() == expected


def test_seed_grad_ratio_nonfinite_is_data() -> None:
    assert math.isinf(seed_grad_ratio(float("inf"), 1.0).item())
    assert math.isnan(seed_grad_ratio(float("nan"), 1.0).item())
    ratios = seed_grad_ratio(torch.tensor([1.0, 4.0]), torch.tensor([2.0, 0.0]))
    assert ratios.tolist() == [0.5, 0.0]


def test_post_clip_norm_matches_torch_clip() -> None:
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = torch.arange(10.0)
    pre = torch.linalg.vector_norm(p.grad).double()
    expected_post = post_clip_norm(pre, 0.5)
    torch.nn.utils.clip_grad_norm_([p], 0.5)
    assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(expected_post.item(), rel=1e-6)
    assert clip_coefficient(torch.tensor(0.1, dtype=torch.float64), 0.5).item() == 1.0
