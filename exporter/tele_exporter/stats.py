"""The public pure-math API (`tele_exporter.stats`), kept as documented; the code lives in `measure/`.

Gradient norms, CV and the seed ratio are in `measure.norms`; KL and the policy-health
math in `measure.policy_math`.
"""

from .measure.norms import (
    CLIP_EPS,
    CV_MEAN_FLOOR,
    SEED_NORM_FLOOR,
    backward_gain,
    clip_coefficient,
    grad_norms,
    gradient_cv,
    index_tensor,
    post_clip_norm,
    seed_grad_ratio,
    seed_rms_ratio,
    stack_float64,
    step_cvs,
    tensor_norm,
    tensor_norm_list,
    tensor_norms,
)
from .measure.policy_math import KL_LOG_RATIO_CLAMP, KL_WEIGHT_FLOOR, approx_kl, head_kl

__all__ = [
    "CLIP_EPS",
    "CV_MEAN_FLOOR",
    "KL_LOG_RATIO_CLAMP",
    "KL_WEIGHT_FLOOR",
    "SEED_NORM_FLOOR",
    "approx_kl",
    "backward_gain",
    "clip_coefficient",
    "grad_norms",
    "gradient_cv",
    "head_kl",
    "index_tensor",
    "post_clip_norm",
    "seed_grad_ratio",
    "seed_rms_ratio",
    "stack_float64",
    "step_cvs",
    "tensor_norm",
    "tensor_norm_list",
    "tensor_norms",
]
