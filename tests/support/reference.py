"""Float64 references for the integration tests, computed without tele-exporter."""

from __future__ import annotations

import math
from typing import Any


def norm64(params: Any) -> float:
    """Float64 L2 norm of the parameters' gradients, independent of tele-exporter."""
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))
