"""Mistakes a newcomer makes on the first day raise at once with a message that names the mistake.

A bare tensor passed where `observe_kl`, `observe_entropy` or `observe_ratios`
expect a dict of heads (e.g. `upd.observe_kl(log_ratio)` for `{"actor": log_ratio}`)
used to be iterated, and the error named its first element: "unknown head tensor(0.)".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from tele_exporter import Telemetry

CALLS: dict[str, Callable[[Any, Any, Any], Any]] = {
    "observe_kl": lambda upd, t, m: upd.observe_kl(t, m),
    "observe_entropy": lambda upd, t, m: upd.observe_entropy(t, m),
    "observe_ratios": lambda upd, t, m: upd.observe_ratios(t, m),
}


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_bare_tensor_for_a_dict_of_heads_says_a_dict_of_heads_is_expected(call: str, enabled: bool) -> None:
    policy = nn.Linear(3, 2)
    tele = Telemetry(policy, heads={"actor": policy}, enabled=enabled)
    r = torch.zeros(5)
    with tele.update() as upd:
        with pytest.raises(TypeError, match=rf"^{call} expects a dict of heads.*\{{'actor': tensor\}}.*got a Tensor"):
            CALLS[call](upd, r, None)
        with pytest.raises(TypeError, match=rf"^{call} expects masks as a dict of heads.*mask.*got a Tensor"):
            CALLS[call](upd, {"actor": r}, torch.ones(5, dtype=torch.bool))
        CALLS[call](upd, {"actor": r}, {"actor": torch.ones(5, dtype=torch.bool)})  # the dict form is fine
    tele.close()
