"""NaN provenance: NaN and Inf steps counted apart per head, the update's first non-finite head and step, each
head's gradient state, read back from a real served /metrics and from the NaN alert's description as promtool
renders the generated rule."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tele_exporter import Telemetry, serve
from tele_exporter.measure.dispatch_counter import DispatchCounter
from tests.support.scraper import Samples, scrape

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "prometheus" / "rules" / "tele-alerts.yml"


class Factored(nn.Module):
    """A real two-head policy over a shared trunk, with a critic and a frozen embedding (no parameter learns)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 16)
        self.op = nn.Linear(16, 4)
        self.slot = nn.Linear(16, 3)
        self.critic = nn.Linear(16, 1)
        self.frozen = nn.Linear(6, 2)
        self.frozen.requires_grad_(False)

    def loss(self, x: torch.Tensor, *, slot: bool = True) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        out = self.op(h).logsumexp(-1).mean() + self.critic(h).square().mean()
        total: torch.Tensor = out + self.slot(h).logsumexp(-1).mean() if slot else out
        return total


def _telemetry(policy: Factored) -> Telemetry:
    return Telemetry(
        policy,
        heads={"op": policy.op, "slot": policy.slot},
        groups={"critic": policy.critic, "frozen": policy.frozen},
    )


def _train(policy: Factored, tele: Telemetry, poison: dict[int, tuple[str, float]], steps: int = 6) -> None:
    """One PPO update of real backward passes; at step s, poison[s] = (head, value) lands in that head's gradient."""
    torch.manual_seed(0)
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    with tele.update() as upd:
        for step in range(steps):
            opt.zero_grad()
            policy.loss(torch.randn(32, 6), slot=step % 2 == 0).backward()  # type: ignore[no-untyped-call]  # slot idle on odd steps
            if step in poison:
                head, value = poison[step]
                grad = getattr(policy, head).weight.grad
                assert grad is not None, f"{head} has no gradient at step {step}"
                grad[0, 0] = value
            total = upd.clip_grad_norm_(0.5)
            if bool(torch.isfinite(total)):  # the trainer skips a non-finite step, as the demo does
                opt.step()


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    for (n, got), value in samples.items():
        if n == name and all(dict(got).get(k) == v for k, v in labels.items()):
            return value
    return None


def test_nan_and_inf_are_counted_apart_and_the_first_head_and_step_are_served() -> None:
    """NaN into slot at step 2, Inf into op at step 4 of a real update: /metrics says which, where and when."""
    policy = Factored()
    tele = _telemetry(policy)
    server = serve(tele, port=0)
    try:
        _train(policy, tele, {2: ("slot", math.nan), 4: ("op", math.inf)})
        samples = scrape(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.close()
        tele.close()
    count = "tele_nonfinite_gradients_total"
    assert _value(samples, count, head="slot", value="nan") == 1.0
    assert _value(samples, count, head="slot", value="inf") == 0.0
    assert _value(samples, count, head="op", value="inf") == 1.0
    assert _value(samples, count, head="op", value="nan") == 0.0
    assert _value(samples, count, head="critic", value="nan") == 0.0
    first = {dict(labels)["head"]: v for (n, labels), v in samples.items() if n == "tele_nonfinite_first_step"}
    assert first == {"slot": 2.0}, "present for the first non-finite head only"
    state = {
        (dict(labels)["head"], dict(labels)["state"]): v
        for (n, labels), v in samples.items()
        if n == "tele_head_gradient_state"
    }
    assert {key for key, v in state.items() if v == 1.0} == {
        ("op", "nonfinite"),
        ("slot", "nonfinite"),
        ("critic", "finite"),
        ("frozen", "not_learnable"),
    }
    assert len(state) == 4 * 4, "every head has its four states, 0 but the one it is in"


def test_the_first_step_counts_in_step_order_whatever_the_rows_grouping() -> None:
    """Rows are grouped by presence pattern (slot idle on odd steps): step 3's Inf on op comes before step 4's NaN."""
    policy = Factored()
    tele = _telemetry(policy)
    _train(policy, tele, {4: ("slot", math.nan), 3: ("op", math.inf)})
    snap = tele.snapshot()
    assert snap.head("op").first_nonfinite_step == 3
    assert snap.head("slot").first_nonfinite_step is None
    assert (snap.head("op").inf_total, snap.head("slot").nan_total) == (1, 1)
    # A clean update clears the provenance and the states; the counts stay (counters).
    _train(policy, tele, {})
    snap = tele.snapshot()
    assert [h.first_nonfinite_step for h in snap.heads] == [None] * 4
    assert {h.name: h.state for h in snap.heads} == {
        "op": "finite",
        "slot": "finite",
        "critic": "finite",
        "frozen": "not_learnable",
    }
    assert snap.head("op").nonfinite_total == 1
    tele.close()


def test_a_head_without_gradient_is_missing_and_nothing_is_exported_before_the_first_update() -> None:
    policy = Factored()
    tele = _telemetry(policy)
    server = serve(tele, port=0)
    try:
        before = scrape(f"http://127.0.0.1:{server.port}/metrics")
        with tele.update() as upd:
            policy.zero_grad(set_to_none=True)
            policy.loss(torch.randn(8, 6), slot=False).backward()  # type: ignore[no-untyped-call]
            upd.clip_grad_norm_(0.5)
        after = scrape(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.close()
        tele.close()
    assert not [k for k in before if k[0] in ("tele_head_gradient_state", "tele_nonfinite_first_step")]
    assert _value(after, "tele_head_gradient_state", head="slot", state="missing") == 1.0
    assert _value(after, "tele_head_gradient_state", head="slot", state="finite") == 0.0
    assert not [k for k in after if k[0] == "tele_nonfinite_first_step"]


def test_provenance_costs_the_step_nothing() -> None:
    """The same kernel launches and no host read per clipped step, a NaN step included."""
    policy = Factored()
    tele = _telemetry(policy)
    twin = Factored()
    twin.load_state_dict(policy.state_dict())
    with tele.update() as upd:
        for poisoned in (False, True):
            for model in (policy, twin):
                model.zero_grad()
                model.loss(torch.randn(4, 6)).backward()  # type: ignore[no-untyped-call]
                grad = model.slot.weight.grad
                if poisoned and grad is not None:
                    grad[0, 0] = math.nan
            with DispatchCounter() as ours:
                upd.clip_grad_norm_(0.5)
            with DispatchCounter() as torchs:
                torch.nn.utils.clip_grad_norm_([p for p in twin.parameters() if p.requires_grad], 0.5)
            assert sum(ours.ops.values()) <= sum(torchs.ops.values()), (ours.ops, torchs.ops)
            assert ours.reads == 0
    tele.close()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (apt-get install prometheus)")
def test_the_nan_alert_names_the_head_and_step_a_real_update_served(tmp_path: Path) -> None:
    """The served series of a real NaN update, replayed through the generated rule: its description names them."""
    policy = Factored()
    tele = _telemetry(policy)
    server = serve(tele, port=0)
    try:
        _train(policy, tele, {})  # a clean update first: the counter starts at 0
        clean = scrape(f"http://127.0.0.1:{server.port}/metrics")
        _train(policy, tele, {4: ("slot", math.nan)})
        poisoned = scrape(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.close()
        tele.close()
    series = []
    for (name, labels), value in poisoned.items():
        if name not in ("tele_nonfinite_gradients_total", "tele_nonfinite_first_step"):
            continue
        text = ", ".join(f'{k}="{v}"' for k, v in (("job", "tele"), ("instance", "t"), *labels))
        before = clean.get((name, labels))
        values = ("_" if before is None else repr(before)) + f" {value!r}x10"
        series.append({"series": f"{name}{{{text}}}", "values": values})
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "30s",
        "tests": [
            {
                "interval": "30s",
                "input_series": series,
                "alert_rule_test": [{"eval_time": "1m", "alertname": "TeleNonFiniteGradients", "exp_alerts": []}],
            }
        ],
    }
    path = tmp_path / "provenance_test.yml"
    path.write_text(yaml.safe_dump(test))
    promtool = shutil.which("promtool")
    assert promtool is not None
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    # promtool prints the alert it got, with its rendered annotations, when none was expected.
    (line,) = [x for x in (out.stdout + out.stderr).splitlines() if "Annotations:" in x and "(head slot)" in x]
    assert "counted 1 optimizer steps with a NaN gradient" in line
    assert "First non-finite in an update: head slot (action) at step 4." in line


def test_the_first_step_is_in_step_order_across_the_fast_and_the_general_path() -> None:
    """foreach=False steps take the general path, whose rows come after the fast path's in the drain."""
    policy = Factored()
    tele = _telemetry(policy)
    torch.manual_seed(1)
    with tele.update() as upd:
        for step in range(4):
            policy.zero_grad()
            policy.loss(torch.randn(8, 6)).backward()  # type: ignore[no-untyped-call]
            grad = policy.slot.weight.grad if step == 1 else policy.op.weight.grad if step == 3 else None
            if grad is not None:
                grad[0, 0] = math.nan
            upd.clip_grad_norm_(0.5, foreach=False if step == 1 else None)  # step 1 alone on the general path
    snap = tele.snapshot()
    assert (snap.head("slot").first_nonfinite_step, snap.head("op").first_nonfinite_step) == (1, None)
    assert (snap.head("slot").nan_total, snap.head("op").nan_total) == (1, 1)
    tele.close()
