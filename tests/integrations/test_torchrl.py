"""docs/torchrl.md: a TorchRL ClipPPOLoss loop on CartPole, instrumented as the doc says, scraped for real.

The loop is TorchRL's own pieces (GymEnv, Collector, GAE, ClipPPOLoss) in the
shape of its PPO examples. Every minibatch the test also recomputes the
per-sample log-ratio r with the actor (the forward pass the integration avoids)
and takes k3 in float64 from it; the scrape after each update must carry that,
TorchRL's own clip fraction, and float64 gradient norms the loop takes itself;
every clip must match torch's clip_grad_norm_ run on a copy of the same gradients.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torchrl")
pytest.importorskip("gymnasium")

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import GymEnv
from torchrl.modules import OneHotCategorical, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import ClipPPOLoss, KLPENPPOLoss
from torchrl.objectives.value import GAE

from tele_exporter import Telemetry, serve
from tele_exporter.integrations.torchrl import k3_kl, loss_groups, loss_heads, observe_loss
from tests.support.reference import norm64
from tests.support.scraper import Samples, scrape

from ..support.scraper import Scraper

FRAMES, MINIBATCH, EPOCHS, ITERATIONS = 128, 32, 3, 4
CLIP_EPSILON, MAX_GRAD_NORM, LEARNING_RATE = 0.2, 0.5, 3e-3  # a rate that makes the surrogate clip in 4 updates
# Dynamo and AOT autograd as torch.compile runs them, with an eager backend: Inductor's C++ codegen would add
# minutes on a 2-core machine and changes nothing about where the graph breaks.
COMPILE_BACKEND = "aot_eager"
K3_ROUNDING = 5e-7  # TorchRL's float32 mean_ratio carries ~1e-7 of rounding into k3 (see k3_kl)


def _agent(env: GymEnv) -> tuple[ProbabilisticActor, ValueOperator]:
    """TorchRL's discrete PPO agent: a categorical actor MLP and a value MLP."""
    obs, actions = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
    actor_net = nn.Sequential(nn.Linear(obs, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, actions))
    actor = ProbabilisticActor(
        TensorDictModule(actor_net, in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"],
        spec=env.action_spec,
        distribution_class=OneHotCategorical,
        return_log_prob=True,
    )
    critic_net = nn.Sequential(nn.Linear(obs, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    return actor, ValueOperator(critic_net, in_keys=["observation"])


def _log_ratio(actor: ProbabilisticActor, loss: ClipPPOLoss, batch: Any) -> torch.Tensor:
    """The per-sample r = log pi_new - log pi_old, from a second actor pass (the test's reference only)."""
    with torch.no_grad():
        dist = actor.get_dist(batch.clone(False))
        return dist.log_prob(batch[loss.tensor_keys.action]) - batch[loss.tensor_keys.sample_log_prob]


def _snippets() -> list[str]:
    """docs/torchrl.md's python blocks: the tutorial loop, the loop without a clip, the compiled update."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "torchrl.md").read_text()
    snippets = re.findall(r"^```python\n(.*?)^```$", doc, re.M | re.S)
    assert len(snippets) == 3
    return snippets


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


@pytest.mark.slow
def test_clip_ppo_loop_exports_what_torchrl_computes() -> None:
    torch.manual_seed(0)
    env = GymEnv("CartPole-v1")
    env.set_seed(0)
    actor, critic = _agent(env)
    loss = ClipPPOLoss(actor, critic, clip_epsilon=CLIP_EPSILON, entropy_coeff=0.01)
    gae = GAE(gamma=0.99, lmbda=0.95, value_network=critic, average_gae=True)
    optimizer = torch.optim.Adam(loss.parameters(), lr=LEARNING_RATE)
    collector = Collector(
        env, actor, frames_per_batch=FRAMES, total_frames=FRAMES * ITERATIONS, auto_register_policy_transforms=False
    )

    tele = Telemetry(loss, heads=loss_heads(loss), groups=loss_groups(loss), const_labels={"run": "torchrl"})
    server = serve(tele, port=0, linger=10)
    logged: list[dict[str, list[float]]] = []
    scraped: list[Samples] = []

    for data in collector:
        keys = ("clip_fraction", "kl_approx", "k3", "k3_exported", "entropy", "ev", "max_ratio")
        keys += ("torch", "pre", "post", "actor", "critic")
        own: dict[str, list[float]] = {k: [] for k in keys}
        with tele.update() as upd:
            for _epoch in range(EPOCHS):
                with torch.no_grad():
                    gae(data)
                for batch in data.reshape(-1)[torch.randperm(FRAMES)].split(MINIBATCH):
                    out = loss(batch)
                    kl = observe_loss(upd, loss, out)  # tele-exporter
                    r = _log_ratio(actor, loss, batch).double()
                    own["k3"].append(float((r.exp() - 1 - r).mean()))
                    own["k3_exported"].append(float(kl))
                    own["clip_fraction"].append(float(out["clip_fraction"]))
                    own["kl_approx"].append(float(out["kl_approx"]))
                    own["entropy"].append(float(out["entropy"]))  # TorchRL's own, as its examples log them
                    own["ev"].append(float(out["explained_variance"]))
                    own["max_ratio"].append(float(out["max_ratio"]))
                    assert float(out["kl_approx"]) == pytest.approx(float(-r.mean()), abs=1e-7)
                    assert float(out["max_ratio"]) == pytest.approx(float(r.exp().max()), rel=1e-6)
                    assert float(out["mean_ratio"]) == pytest.approx(float(r.exp().mean()), rel=1e-6)

                    total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
                    optimizer.zero_grad()
                    total.backward()
                    shadow = [nn.Parameter(torch.empty_like(p)) for p in loss.parameters()]
                    for copy, p in zip(shadow, loss.parameters(), strict=True):
                        copy.grad = p.grad.clone()
                    own["torch"].append(float(torch.nn.utils.clip_grad_norm_(shadow, MAX_GRAD_NORM)))  # torch's own
                    own["pre"].append(norm64(loss.parameters()))
                    own["actor"].append(norm64(actor.parameters()))
                    own["critic"].append(norm64(critic.parameters()))
                    returned = upd.clip_grad_norm_(MAX_GRAD_NORM)  # tele-exporter: was nn.utils.clip_grad_norm_
                    assert float(returned) == pytest.approx(own["torch"][-1], rel=1e-6)
                    own["post"].append(norm64(loss.parameters()))
                    for copy, p in zip(shadow, loss.parameters(), strict=True):
                        torch.testing.assert_close(p.grad, copy.grad, rtol=1e-6, atol=0.0)  # clipped as torch's
                    optimizer.step()
        logged.append(own)
        scraped.append(scrape(server.url))
    collector.shutdown()
    assert server.close()
    tele.close()

    run = ("run", "torchrl")
    for own, got in zip(logged, scraped, strict=True):
        assert got[("tele_ppo_clip_fraction", (run,))] == pytest.approx(_mean(own["clip_fraction"]), rel=1e-12)
        assert got[("tele_policy_entropy", (run,))] == pytest.approx(_mean(own["entropy"]), rel=1e-12)
        assert got[("tele_explained_variance", (run,))] == pytest.approx(_mean(own["ev"]), rel=1e-12, abs=1e-15)
        # TELE-151's max over the update: the largest of TorchRL's own per-minibatch max_ratio, exactly.
        assert got[("tele_head_ratio_max", (("head", "actor"), run))] == max(own["max_ratio"])
        for exported, reference in zip(own["k3_exported"], own["k3"], strict=True):
            assert exported == pytest.approx(reference, abs=K3_ROUNDING)
        assert got[("tele_kl_divergence", (run,))] == pytest.approx(_mean(own["k3"]), abs=K3_ROUNDING)
        assert got[("tele_kl_divergence", (run,))] >= 0.0
        for clip in ("pre", "post"):
            assert got[("tele_policy_grad_norm", (("clip", clip), run))] == pytest.approx(_mean(own[clip]), rel=1e-6)
        for head, kind in (("actor", "action"), ("critic", "other")):
            key = ("tele_head_grad_norm", (("head", head), ("kind", kind), run))
            assert got[key] == pytest.approx(_mean(own[head]), rel=1e-6)
        assert max(own["post"]) <= MAX_GRAD_NORM * (1 + 1e-5)
    assert scraped[-1][("tele_ppo_updates_total", (run,))] == ITERATIONS
    assert tele.errors() == {}
    kl_approx = [v for own in logged for v in own["kl_approx"]]
    assert min(kl_approx) < 0.0  # TorchRL's signed kl_approx went negative; the exported k3 never does
    assert max(v for own in logged for v in own["clip_fraction"]) > 0.0  # the surrogate clipped


@pytest.mark.slow
def test_the_docs_snippet_runs_as_written() -> None:
    snippet = _snippets()[0]
    torch.manual_seed(0)
    env = GymEnv("CartPole-v1")
    env.set_seed(0)
    actor, critic = _agent(env)
    ns: dict[str, Any] = {
        "torch": torch,
        "ClipPPOLoss": ClipPPOLoss,
        "actor": actor,
        "critic": critic,
        "collector": Collector(
            env, actor, frames_per_batch=FRAMES, total_frames=2 * FRAMES, auto_register_policy_transforms=False
        ),
        "advantage_module": GAE(gamma=0.99, lmbda=0.95, value_network=critic, average_gae=True),
        "num_epochs": 2,
        "minibatch_size": MINIBATCH,
        "max_grad_norm": MAX_GRAD_NORM,
        "run_name": "doc",
    }
    scraper = Scraper(ns)
    scraper.start()
    try:
        exec(compile(snippet, "docs/torchrl.md", "exec"), ns)
    finally:
        scraper.stop()
    got = scraper.samples()  # server.close() (linger=30) returned after a scrape of the last update
    run = ("run", "doc")
    assert got[("tele_ppo_updates_total", (run,))] == 2
    assert got[("tele_kl_divergence", (run,))] >= 0.0
    assert ("tele_ppo_clip_fraction", (run,)) in got
    assert {labels for name, labels in got if name == "tele_head_grad_norm"} == {
        (("head", "actor"), ("kind", "action"), run),
        (("head", "critic"), ("kind", "other"), run),
    }
    assert ns["tele"].errors() == {}


def test_k3_kl_is_mean_ratio_minus_one_plus_kl_approx() -> None:
    out = {"mean_ratio": torch.tensor(1.0125), "kl_approx": torch.tensor(-0.0100), "clip_fraction": torch.tensor(0.25)}
    expected = float(torch.tensor(1.0125).double()) - 1.0 + float(torch.tensor(-0.0100).double())
    assert float(k3_kl(out)) == expected
    assert k3_kl(out).dtype == torch.float64


def test_losses_whose_outputs_do_not_give_k3_are_refused() -> None:
    env = GymEnv("CartPole-v1")
    actor, critic = _agent(env)
    with pytest.raises(ValueError, match="delay_actor"):
        loss_heads(ClipPPOLoss(actor, critic, delay_actor=True))
    with pytest.raises(ValueError, match="max_importance_ratio"):
        loss_heads(ClipPPOLoss(actor, critic, max_importance_ratio=2.0))
    with pytest.raises(TypeError, match="KLPENPPOLoss"):
        loss_heads(KLPENPPOLoss(actor, critic))  # type: ignore[arg-type]
    loss = ClipPPOLoss(actor, critic)
    assert set(loss_heads(loss)) == {"actor"} and set(loss_groups(loss)) == {"critic"}
    tele = Telemetry(loss, heads=loss_heads(loss), groups=loss_groups(loss))
    with tele.update() as upd, pytest.raises(KeyError, match="kl_approx"):
        observe_loss(upd, loss, {"mean_ratio": torch.tensor(1.0), "clip_fraction": torch.tensor(0.0)})
    tele.close()
    env.close()


def _gaussian_agent(env: GymEnv) -> tuple[ProbabilisticActor, ValueOperator]:
    """ppo_mujoco.py's kind of agent: a TanhNormal actor (loc and scale from one MLP) and a value MLP."""
    obs, actions = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
    actor_net = nn.Sequential(nn.Linear(obs, 64), nn.Tanh(), nn.Linear(64, 2 * actions), NormalParamExtractor())
    actor = ProbabilisticActor(
        TensorDictModule(actor_net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=env.action_spec,
        distribution_class=TanhNormal,
        distribution_kwargs={"low": env.action_spec.space.low, "high": env.action_spec.space.high},
        return_log_prob=True,
    )
    critic_net = nn.Sequential(nn.Linear(obs, 64), nn.Tanh(), nn.Linear(64, 1))
    return actor, ValueOperator(critic_net, in_keys=["observation"])


class _Logged:
    """What the loss returned and the float64 norms before each optimizer step, per update, taken by the test."""

    def __init__(self, loss: ClipPPOLoss) -> None:
        self.loss = loss
        self.updates: list[dict[str, list[float]]] = []
        self.graphs: list[int] = []  # graphs torch.compile had made when each update began

    def batches(self, collector: Collector) -> Any:
        for data in collector:
            self.graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            self.updates.append({"entropy": [], "ev": [], "clip_fraction": [], "kl": [], "max_ratio": [], "pre": []})
            yield data

    def observe_loss(self, upd: Any, loss: ClipPPOLoss, out: Any) -> torch.Tensor:
        own = self.updates[-1]
        own["entropy"].append(float(out["entropy"]))
        own["ev"].append(float(out["explained_variance"]))
        own["clip_fraction"].append(float(out["clip_fraction"]))
        own["max_ratio"].append(float(out["max_ratio"]))
        own["kl"].append(float(out["mean_ratio"]) - 1.0 + float(out["kl_approx"]))
        return observe_loss(upd, loss, out)

    def before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.updates[-1]["pre"].append(norm64(self.loss.parameters()))


def _check_last_update(tele: Telemetry, logged: _Logged, steps: int) -> None:
    """The final snapshot against what the loss returned and the norms the test took, for the last update."""
    snap, own = tele.snapshot(), logged.updates[-1]
    assert snap.updates == len(logged.updates) and snap.steps == steps == len(own["pre"])
    assert snap.policy.entropy == pytest.approx(_mean(own["entropy"]), rel=1e-12)
    assert snap.policy.explained_variance == pytest.approx(_mean(own["ev"]), rel=1e-12, abs=1e-15)
    assert snap.clip_fraction == pytest.approx(_mean(own["clip_fraction"]), rel=1e-12, abs=1e-15)
    assert snap.kl == pytest.approx(_mean(own["kl"]), abs=K3_ROUNDING)
    assert snap.policy.head_ratio_max == {"actor": max(own["max_ratio"])}
    assert snap.grad_norm_pre == pytest.approx(_mean(own["pre"]), rel=1e-6)
    assert tele.errors() == {}


@pytest.mark.slow
def test_the_docs_loop_without_a_clip_observes_gradients_with_two_optimizers() -> None:
    torch.manual_seed(0)
    env = GymEnv("Pendulum-v1")
    env.set_seed(0)
    actor, critic = _gaussian_agent(env)
    loss = ClipPPOLoss(actor, critic, clip_epsilon=CLIP_EPSILON, entropy_coeff=0.01)
    actor_optim = torch.optim.Adam(actor.parameters(), lr=LEARNING_RATE)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=LEARNING_RATE)
    logged = _Logged(loss)
    actor_optim.register_step_pre_hook(logged.before_step)  # the first step: every gradient is in place
    collector = Collector(
        env, actor, frames_per_batch=FRAMES, total_frames=2 * FRAMES, auto_register_policy_transforms=False
    )
    ns: dict[str, Any] = {
        "torch": torch,
        "Telemetry": Telemetry,
        "loss_heads": loss_heads,
        "loss_groups": loss_groups,
        "observe_loss": logged.observe_loss,
        "loss_module": loss,
        "collector": logged.batches(collector),
        "adv_module": GAE(gamma=0.99, lmbda=0.95, value_network=critic, average_gae=True),
        "num_epochs": 2,
        "minibatch_size": MINIBATCH,
        "actor_optim": actor_optim,
        "critic_optim": critic_optim,
    }
    exec(compile(_snippets()[1], "docs/torchrl.md", "exec"), ns)
    collector.shutdown()
    tele = ns["tele"]
    _check_last_update(tele, logged, 2 * FRAMES // MINIBATCH)
    snap = tele.snapshot()
    assert snap.grad_norm_post == snap.grad_norm_pre  # nothing clipped
    assert [(h.name, h.kind) for h in snap.heads] == [("actor", "action"), ("critic", "other")]
    tele.close()


@pytest.mark.slow
def test_the_docs_compiled_update_clips_eagerly_inside_torch_compile() -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()
    env = GymEnv("CartPole-v1")
    env.set_seed(0)
    actor, critic = _agent(env)
    loss = ClipPPOLoss(actor, critic, clip_epsilon=CLIP_EPSILON, entropy_coeff=0.01)
    optim = torch.optim.Adam(loss.parameters(), lr=LEARNING_RATE)
    logged = _Logged(loss)
    optim.register_step_pre_hook(logged.before_step)  # after the clip: these are the clipped gradients
    collector = Collector(
        env, actor, frames_per_batch=FRAMES, total_frames=3 * FRAMES, auto_register_policy_transforms=False
    )
    snippet = _snippets()[2]
    assert "update = torch.compile(update)" in snippet
    snippet = snippet.replace("torch.compile(update)", f"torch.compile(update, backend={COMPILE_BACKEND!r})")
    ns: dict[str, Any] = {
        "torch": torch,
        "Telemetry": Telemetry,
        "loss_heads": loss_heads,
        "loss_groups": loss_groups,
        "observe_loss": logged.observe_loss,
        "loss_module": loss,
        "optim": optim,
        "collector": logged.batches(collector),
        "adv_module": GAE(gamma=0.99, lmbda=0.95, value_network=critic, average_gae=True),
        "num_epochs": 2,
        "minibatch_size": MINIBATCH,
        "max_grad_norm": MAX_GRAD_NORM,
    }
    counters = torch._dynamo.utils.counters
    counters.clear()
    exec(compile(snippet, "docs/torchrl.md", "exec"), ns)
    collector.shutdown()
    tele = ns["tele"]
    snap, own = tele.snapshot(), logged.updates[-1]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # compiled, with a graph break at the clip
    assert logged.graphs == [0, graphs, graphs]  # all made in the first update: a new clip recompiles nothing
    assert snap.updates == 3 and snap.steps == 2 * FRAMES // MINIBATCH
    assert max(own["pre"]) <= MAX_GRAD_NORM * (1 + 1e-5)  # the optimizer saw clipped gradients
    assert snap.grad_norm_post == pytest.approx(_mean(own["pre"]), rel=1e-6)
    assert snap.grad_norm_pre is not None and snap.grad_norm_pre >= snap.grad_norm_post
    assert snap.policy.entropy == pytest.approx(_mean(own["entropy"]), rel=1e-12)
    assert snap.clip_fraction == pytest.approx(_mean(own["clip_fraction"]), rel=1e-12, abs=1e-15)
    assert snap.policy.head_ratio_max == {"actor": max(own["max_ratio"])}
    assert tele.errors() == {}
    tele.close()
