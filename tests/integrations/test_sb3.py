"""TelemetryCallback against a real Stable-Baselines3 PPO run on CartPole."""

from __future__ import annotations

import math
import urllib.request
from typing import Any

import pytest

pytest.importorskip("stable_baselines3")
pytest.importorskip("gymnasium")

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList

from tele_exporter.catalog import default_catalog
from tele_exporter.integrations.sb3 import TelemetryCallback, policy_heads


class _Recorder(BaseCallback):  # type: ignore[misc]
    """Runs after TelemetryCallback: pairs each published snapshot with what SB3 logged."""

    def __init__(self, tele_cb: TelemetryCallback) -> None:
        super().__init__()
        self.tele_cb = tele_cb
        self.pairs: list[dict[str, Any]] = []
        self.max_grad_norms: list[float] = []

    def _record(self) -> None:
        tele = self.tele_cb.tele
        assert tele is not None
        snap = tele.snapshot()
        if snap.updates > len(self.pairs):
            logged = self.model.logger.name_to_value
            self.pairs.append(
                {
                    "snap": snap,
                    "approx_kl": float(logged["train/approx_kl"]),
                    "clip_fraction": float(logged["train/clip_fraction"]),
                    "entropy_loss": float(logged["train/entropy_loss"]),
                    "explained_variance": float(logged["train/explained_variance"]),
                    "n_updates": int(self.model._n_updates),
                }
            )

    def _on_rollout_start(self) -> None:
        self._record()

    def _on_step(self) -> bool:
        self.max_grad_norms.append(float(self.model.max_grad_norm))
        return True

    def _on_training_end(self) -> None:
        self._record()


def _model(**kwargs: Any) -> PPO:
    torch.manual_seed(0)
    return PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=4, seed=0, device="cpu", **kwargs)


@pytest.mark.slow
def test_exported_kl_clip_fraction_entropy_and_ev_equal_what_sb3_logs() -> None:
    model = _model(learning_rate=3e-3)
    cb = TelemetryCallback(port=0, linger=10)
    rec = _Recorder(cb)
    try:
        model.learn(total_timesteps=64 * 6, callback=CallbackList([cb, rec]))
        assert cb.tele is not None and cb.server is not None
        assert len(rec.pairs) == 6
        for pair in rec.pairs:
            snap = pair["snap"]
            assert snap.kl == pair["approx_kl"]
            assert snap.clip_fraction == pair["clip_fraction"]
            assert snap.policy.entropy == -pair["entropy_loss"]
            assert snap.policy.explained_variance == pair["explained_variance"]
            assert snap.steps == 4 * 2
            assert snap.early_stops == 0
            for head in ("action_net", "value_net"):
                value = snap.head(head).current
                assert math.isfinite(value) and value > 0
            assert snap.grad_norm_post <= 0.5 + 1e-6
            assert snap.grad_norm_pre >= snap.grad_norm_post
        assert any(p["snap"].grad_norm_pre > 0.5 for p in rec.pairs), "no update was clipped: pre == post"
        assert set(rec.max_grad_norms) == {0.5}, "max_grad_norm must be restored outside train()"
        assert model.max_grad_norm == 0.5
        body = urllib.request.urlopen(cb.server.url, timeout=5).read().decode()
        last = rec.pairs[-1]
        assert f"tele_kl_divergence {last['approx_kl']!r}" in body
        assert f"{default_catalog()['clip_fraction'].name} {last['clip_fraction']!r}" in body
        assert f"tele_policy_entropy {-last['entropy_loss']!r}" in body
        assert f"tele_explained_variance {last['explained_variance']!r}" in body
        assert 'tele_head_grad_norm{head="action_net"}' in body
        assert 'tele_head_grad_norm{head="value_net"}' in body
        assert cb.server.linger == 10  # the final update was just scraped: close() returns at once
    finally:
        cb.close()


@pytest.mark.slow
def test_kl_early_stop_is_counted() -> None:
    model = _model(learning_rate=3e-2, target_kl=1e-4)
    cb = TelemetryCallback()
    rec = _Recorder(cb)
    try:
        model.learn(total_timesteps=64 * 3, callback=CallbackList([cb, rec]))
        snap = rec.pairs[-1]["snap"]
        assert snap.early_stops >= 1
        assert snap.steps < 8
        assert [p["snap"].kl for p in rec.pairs] == [p["approx_kl"] for p in rec.pairs]
    finally:
        cb.close()


def test_heads_come_from_the_policy() -> None:
    model = _model()
    heads = policy_heads(model.policy)
    assert heads == {"action_net": model.policy.action_net, "value_net": model.policy.value_net}


def test_a_telemetry_over_another_module_is_refused() -> None:
    from tele_exporter import Telemetry

    model = _model()
    other = torch.nn.Linear(2, 2)
    cb = TelemetryCallback(Telemetry(other, heads={"x": other}))
    with pytest.raises(ValueError, match=r"model\.policy"):
        model.learn(total_timesteps=64, callback=cb)
