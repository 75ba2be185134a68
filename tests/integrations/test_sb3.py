"""TelemetryCallback against real Stable-Baselines3 runs: PPO on CartPole, Pendulum and MultiDiscrete, A2C on CartPole.

Every exported policy value is compared for equality with what SB3 itself logged
for the same update (`model.logger.name_to_value`), never with a value re-derived here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
import urllib.request
from typing import Any

import pytest

pytest.importorskip("stable_baselines3")
pytest.importorskip("gymnasium")

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList

from tele_exporter.catalog import default_catalog
from tele_exporter.integrations.sb3 import TelemetryCallback, policy_groups, policy_heads
from tele_exporter.server.http import PortInUseError
from tests.support.reference import norm64
from tests.support.scraper import scrape


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
            pair: dict[str, Any] = {"snap": snap, "n_updates": int(self.model._n_updates)}
            for key in ("approx_kl", "clip_fraction", "entropy_loss", "explained_variance", "std"):
                if f"train/{key}" in logged:
                    pair[key] = float(logged[f"train/{key}"])
            self.pairs.append(pair)

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
        assert 'tele_head_grad_norm{head="action_net",kind="action"}' in body
        assert 'tele_head_grad_norm{head="value_net",kind="other"}' in body
        assert "\ntele_policy_std " not in body and "std" not in last  # a categorical policy: no std, no sample
        assert cb.server.linger == 10
        assert cb.close() is True  # the final update was just scraped: close() returns at once
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
    assert policy_heads(model.policy) == {"action_net": model.policy.action_net}
    assert policy_groups(model.policy) == {"value_net": model.policy.value_net}


NVEC = (3, 2, 4)


class _Choices(gym.Env[np.ndarray, np.ndarray]):
    """A tiny MultiDiscrete task: reward for each sub-action that matches the observation's sign pattern."""

    observation_space = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
    action_space = gym.spaces.MultiDiscrete(list(NVEC))

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._t = 0
        self._obs = self.np_random.uniform(-1, 1, size=4).astype(np.float32)
        return self._obs, {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        target = [int(self._obs[i] > 0) for i in range(3)]
        reward = float(sum(int(a) == t for a, t in zip(action, target, strict=True)))
        self._t += 1
        self._obs = self.np_random.uniform(-1, 1, size=4).astype(np.float32)
        return self._obs, reward, False, self._t >= 16, {}


def _slice_norms(policy: torch.nn.Module) -> dict[str, float]:
    """Float64 per-sub-action norms from action_net's rows, and value_net's, read off the parameter gradients."""
    weight, bias = policy.action_net.weight.grad, policy.action_net.bias.grad
    out: dict[str, float] = {}
    start = 0
    for i, n in enumerate(NVEC):
        rows = np.concatenate(
            [weight[start : start + n].double().numpy().ravel(), bias[start : start + n].double().numpy()]
        )
        out[f"action_net.{i}"] = float(np.sqrt(np.sum(rows**2)))
        start += n
    value = np.concatenate([p.grad.double().numpy().ravel() for p in policy.value_net.parameters()])
    out["value_net"] = float(np.sqrt(np.sum(value**2)))
    return out


def _cv(norms: list[float]) -> float:
    values = np.array(norms, dtype=np.float64)
    return float(np.std(values, ddof=1) / max(abs(float(values.mean())), 1e-8))


class _StepRecorder(_Recorder):
    """Also keeps the float64 per-slice norms of every optimizer step, taken before anything clips."""

    def __init__(self, tele_cb: TelemetryCallback) -> None:
        super().__init__(tele_cb)
        self.steps: list[dict[str, float]] = []
        self.per_update: list[list[dict[str, float]]] = []

    def before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps.append(_slice_norms(self.model.policy))

    def _record(self) -> None:
        before = len(self.pairs)
        super()._record()
        if len(self.pairs) > before:
            self.per_update.append(self.steps)
            self.steps = []


@pytest.mark.slow
def test_multi_discrete_sub_actions_are_heads_matching_a_float64_reference() -> None:
    torch.manual_seed(0)
    model = PPO("MlpPolicy", _Choices(), n_steps=64, batch_size=32, n_epochs=3, seed=0, device="cpu")
    cb = TelemetryCallback()
    rec = _StepRecorder(cb)
    model.policy.optimizer.register_step_pre_hook(rec.before_step)  # runs before the callback's: pre-clip grads
    try:
        model.learn(total_timesteps=64 * 4, callback=CallbackList([cb, rec]))
        assert cb.tele is not None
        assert [(h.name, h.kind) for h in cb.tele.snapshot().heads] == [
            ("action_net.0", "action"),
            ("action_net.1", "action"),
            ("action_net.2", "action"),
            ("value_net", "other"),
        ]
        assert len(rec.per_update) == 4
        for pair, steps in zip(rec.pairs, rec.per_update, strict=True):
            snap = pair["snap"]
            assert snap.steps == len(steps) == 3 * 2
            for name in steps[0]:
                expected = float(np.mean([s[name] for s in steps]))
                assert snap.head(name).current == pytest.approx(expected, rel=1e-6), name
            cvs = [_cv([s[f"action_net.{i}"] for i in range(len(NVEC))]) for s in steps]
            assert snap.gradient_cv == pytest.approx(float(np.mean(cvs)), rel=1e-6)
        assert cb.tele.errors() == {}
    finally:
        cb.close()


def test_a_telemetry_over_another_module_is_refused() -> None:
    from tele_exporter import Telemetry

    model = _model()
    other = torch.nn.Linear(2, 2)
    cb = TelemetryCallback(Telemetry(other, heads={"x": other}))
    with pytest.raises(ValueError, match=r"model\.policy"):
        model.learn(total_timesteps=64, callback=cb)


def _a2c() -> A2C:
    torch.manual_seed(0)
    return A2C("MlpPolicy", "CartPole-v1", n_steps=16, seed=0, device="cpu")


@pytest.mark.slow
def test_a2c_one_optimizer_step_per_update_and_sb3s_own_entropy_and_ev() -> None:
    model = _a2c()
    cb = TelemetryCallback(port=0, linger=5)
    rec = _Recorder(cb)
    try:
        model.learn(total_timesteps=16 * 5, callback=CallbackList([cb, rec]))
        assert cb.tele is not None and len(rec.pairs) == 5
        for pair in rec.pairs:
            snap = pair["snap"]
            assert snap.steps == 1 and snap.early_stops == 0  # A2C: one optimizer step per train()
            assert snap.policy.entropy == -pair["entropy_loss"]
            assert snap.policy.explained_variance == pair["explained_variance"]
            assert snap.kl is None and snap.clip_fraction is None  # A2C logs neither
            assert snap.grad_norm_post <= model.max_grad_norm + 1e-6
        assert model.max_grad_norm == 0.5
        assert cb.tele.errors() == {}
    finally:
        cb.close()


def test_an_algorithm_that_is_not_ppo_or_a2c_is_refused_when_learn_starts() -> None:
    model = DQN("MlpPolicy", "CartPole-v1", learning_starts=0, seed=0, device="cpu")
    cb = TelemetryCallback()
    with pytest.raises(TypeError, match=r"supports PPO and A2C .*got DQN"):
        model.learn(total_timesteps=8, callback=cb)
    cb.close()


def test_the_port_is_bound_at_construction_so_the_url_prints_before_learn() -> None:
    cb = TelemetryCallback(port=0, const_labels={"run": "early"})
    try:
        assert cb.url is not None and cb.server is not None and cb.server.port > 0
        assert cb.url == f"http://127.0.0.1:{cb.server.port}/metrics"
        assert scrape(cb.url) == {}  # serving before the model is known: nothing measured yet
        with urllib.request.urlopen(cb.server.base_url + "/api/snapshot", timeout=5) as resp:
            assert resp.status == 200
        model = _model()
        model.learn(total_timesteps=64, callback=cb)
        got = scrape(cb.url)
        assert got[("tele_ppo_updates_total", (("run", "early"),))] == 1
        assert ("tele_head_grad_norm", (("head", "action_net"), ("kind", "action"), ("run", "early"))) in got
    finally:
        cb.close(linger=0)


def test_a_taken_fixed_port_raises_at_construction_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=rf"127\.0\.0\.1:{port}.*in use"):
            TelemetryCallback(port=port)


@pytest.mark.slow
def test_learn_returns_at_once_and_close_lingers_by_default_until_the_final_update_is_scraped() -> None:
    model = _model()
    cb = TelemetryCallback(port=0)
    model.learn(total_timesteps=64 * 2, callback=cb)
    assert cb.server is not None and cb.server.running  # learn() returned; still serving
    url = cb.url
    assert url is not None
    seen: list[float] = []

    def prometheus() -> None:
        time.sleep(1.0)  # a scrape that comes after learn() returned and close() began to wait
        seen.append(scrape(url)[("tele_ppo_updates_total", ())])

    scraper = threading.Thread(target=prometheus)
    scraper.start()
    started = time.monotonic()
    assert cb.close() is True
    waited = time.monotonic() - started
    scraper.join()
    assert seen == [2.0]
    assert 0.9 < waited < 30.0


def test_a_linger_that_times_out_returns_false_and_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    cb = TelemetryCallback(port=0, linger=0.2)
    model.learn(total_timesteps=64, callback=cb)
    url = cb.url
    with caplog.at_level(logging.WARNING, logger="tele_exporter"):
        assert cb.close() is False
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("tele_exporter")]
    assert len(lines) == 1 and "final update" in lines[0] and f"{url}" in lines[0] and "0.2 s" in lines[0]


class _LogStdNorms:
    """Float64 norms of a policy's log_std gradient at every optimizer step, before anything clips."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.log_std: list[float] = []
        policy.optimizer.register_step_pre_hook(self.before_step)  # registered first: runs before the callback's

    def before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.log_std.append(norm64([self.policy.log_std]))


@pytest.mark.slow
def test_a_gaussian_policys_log_std_is_a_group_and_its_values_equal_what_sb3_logs() -> None:
    torch.manual_seed(0)
    model = PPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, n_epochs=2, seed=0, device="cpu")
    norms = _LogStdNorms(model.policy)
    cb = TelemetryCallback(port=0)
    rec = _Recorder(cb)
    try:
        model.learn(total_timesteps=64 * 3, callback=CallbackList([cb, rec]))
        assert cb.tele is not None and cb.url is not None
        got = scrape(cb.url)
        stds = np.exp(model.policy.log_std.detach().double().numpy())  # float64 reference, after the last update
        assert got[("tele_policy_std", ())] == rec.pairs[-1]["std"]  # SB3's own train/std, through /metrics
        assert got[("tele_policy_std", ())] == pytest.approx(float(stds.mean()), rel=1e-6)
        assert [(h.name, h.kind) for h in cb.tele.snapshot().heads] == [
            ("action_net", "action"),
            ("value_net", "other"),
            ("log_std", "other"),
        ]
        assert len(rec.pairs) == 3 and len(norms.log_std) == 3 * 2 * 2
        for i, pair in enumerate(rec.pairs):
            snap = pair["snap"]
            assert "std" in pair  # SB3 logs train/std for this policy
            assert snap.kl == pair["approx_kl"]
            assert snap.clip_fraction == pair["clip_fraction"]
            assert snap.policy.entropy == -pair["entropy_loss"]
            assert snap.policy.explained_variance == pair["explained_variance"]
            assert snap.policy.action_std == pair["std"]
            steps = norms.log_std[i * 4 : (i + 1) * 4]
            assert snap.head("log_std").current == pytest.approx(float(np.mean(steps)), rel=1e-6)
        assert cb.tele.errors() == {}
    finally:
        cb.close()


@pytest.mark.slow
def test_the_scale_docs_snippet_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "scale.md").read_text()
    section = doc[doc.index("## Stable-Baselines3") :]
    snippet = section[section.index("```python\n") + len("```python\n") : section.index("\n```\n")]
    assert "model.learn(100_000, callback=callback)" in snippet
    snippet = snippet.replace("model.learn(100_000,", "model.learn(256,")  # a short run; nothing else changes
    ns: dict[str, Any] = {}
    seen: list[float] = []
    done = threading.Event()

    def prometheus() -> None:
        while not done.wait(0.05):
            callback = ns.get("callback")
            if callback is not None and callback.url is not None and callback.server is not None:
                with contextlib.suppress(OSError):
                    seen.append(scrape(callback.url).get(("tele_ppo_updates_total", ()), 0.0))

    scraper = threading.Thread(target=prometheus, daemon=True)
    scraper.start()
    try:
        exec(compile(snippet, "docs/scale.md", "exec"), ns)
    finally:
        done.set()
        scraper.join()
    printed = capsys.readouterr().out
    assert printed.startswith("tele-exporter: http://127.0.0.1:")
    assert ns["model"].num_timesteps >= 256
    assert seen and seen[-1] == ns["model"]._n_updates / ns["model"].n_epochs  # close() waited for the last update
