"""integrations.rllib against a real local Ray (`ray.init(num_cpus=2)`): RLlib's PPO on CartPole.

Every expected value comes from RLlib or from a plain run: the result dict's entropy, explained
variance and logged global norm; RLlib's own `compute_global_norm` of the gradients it clips and
of what its clip leaves, and numpy on the loss's own tensors (recorded by `_Referee`, a user's
PPOTorchLearner subclass, which `instrument` keeps below the telemetry); a plain run's weights.
The Prometheus test (two learner actors, file_sd, the generated rank rules) is in
`test_two_learner_actors_under_a_real_prometheus_are_ranks`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.rllib", reason="Ray RLlib is not installed (pip install -e '.[rllib]')")

import gymnasium as gym
import numpy as np
import ray
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchMultiCategorical
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.examples.envs.classes.multi_agent import MultiAgentCartPole
from ray.rllib.utils.torch_utils import compute_global_norm

from tele_exporter.integrations.rllib import instrument, log_ratios, module_groups, module_heads
from tests.support.servers import Running, bindable, poll, start_prometheus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
CLIP_PARAM = 0.2
GRAD_CLIP = 0.5


# -- a real local Ray ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local Ray for the module's tests, on 2 CPUs; the tests skip where it cannot start."""
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # no shared memory, no free ports, a sandbox that forbids its processes...
        pytest.skip(f"Ray cannot start here: {type(exc).__name__}: {exc}")
    try:
        yield
    finally:
        ray.shutdown()


# -- the referee: a user's own learner subclass that records what RLlib computes ------------------


class _Referee(PPOTorchLearner):  # type: ignore[misc]
    """Records, per minibatch, the loss's tensors and RLlib's own global norms before and after its clip."""

    def build(self) -> None:
        super().build()
        self.recorded: list[dict[str, Any]] = []
        self.poison: set[str] = set()  # module ids whose next gradients get one NaN (before anyone sees them)

    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: Any, fwd_out: Any) -> Any:
        loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        mask = batch.get(Columns.LOSS_MASK)
        self.recorded.append(
            {
                "module": module_id,
                "logits": fwd_out[Columns.ACTION_DIST_INPUTS].detach().numpy().astype(np.float64),
                "actions": batch[Columns.ACTIONS].numpy(),
                "old_logp": batch[Columns.ACTION_LOGP].numpy().astype(np.float64),
                "mask": None if mask is None else mask.numpy(),
            }
        )
        return loss

    def compute_gradients(self, loss_per_module: Any, **kwargs: Any) -> Any:
        grads = super().compute_gradients(loss_per_module, **kwargs)
        for module_id in list(self.poison):
            weight = self.module[module_id].unwrapped().pi.net.mlp[0].weight
            grads[weight][0, 0] = math.nan
            self.poison.discard(module_id)
        return grads

    def postprocess_gradients_for_module(
        self, *, module_id: str, config: Any = None, module_gradients_dict: Any
    ) -> Any:
        module = self.module[module_id].unwrapped()

        def norm(params: Any) -> float:
            wanted = {id(p) for p in params}
            return float(compute_global_norm([g for p, g in module_gradients_dict.items() if id(p) in wanted]))

        pre = {"pi": norm(module.pi.parameters()), "vf": norm(module.vf.parameters())}
        pre["total"] = float(compute_global_norm(list(module_gradients_dict.values())))
        out = super().postprocess_gradients_for_module(
            module_id=module_id, config=config, module_gradients_dict=module_gradients_dict
        )
        post = float(compute_global_norm(list(out.values())))
        self.recorded.append({"module": module_id, "norms": pre, "post": post})
        return out

    def take(self) -> list[dict[str, Any]]:
        """What was recorded since the last take."""
        out, self.recorded = self.recorded, []
        return out


def _config(num_learners: int = 0, learner: type | None = _Referee, env: Any = "CartPole-v1") -> PPOConfig:
    config = (
        PPOConfig()
        .environment(env)
        .env_runners(num_env_runners=0)
        .learners(num_learners=num_learners)
        .training(
            train_batch_size_per_learner=256,
            minibatch_size=64,
            num_epochs=2,
            lr=3e-4,
            clip_param=CLIP_PARAM,
            grad_clip=GRAD_CLIP,
            grad_clip_by="global_norm",
        )
        .debugging(seed=0)
    )
    if learner is not None:
        config.learners(learner_class=learner)
    return config


def _on_learners(algo: Any, func: Callable[[Any], Any]) -> list[Any]:
    """`func(learner)` on every learner (the local one, or each actor), in learner order."""
    return [r.get() for r in algo.learner_group.foreach_learner(func)]


def _referee_values(recorded: list[dict[str, Any]], module: str) -> dict[str, float]:
    """The iteration's expected KL, clip fraction and gradient norms, from what RLlib computed."""
    kls, fractions = [], []
    for r in (r for r in recorded if r["module"] == module and "logits" in r):
        logits = r["logits"]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        new = np.take_along_axis(logp, r["actions"].astype(np.int64)[:, None], -1)[:, 0]
        ratio_log = new - r["old_logp"]
        valid = np.ones_like(ratio_log, dtype=bool) if r["mask"] is None else r["mask"].astype(bool)
        kls.append(float(np.mean(np.expm1(ratio_log[valid]) - ratio_log[valid])))
        fractions.append(float(np.mean(np.abs(np.exp(ratio_log[valid]) - 1) > CLIP_PARAM)))
    steps = [r for r in recorded if r["module"] == module and "norms" in r]
    return {
        "kl": statistics.fmean(kls),
        "clip_fraction": statistics.fmean(fractions),
        "pre": statistics.fmean(s["norms"]["total"] for s in steps),
        "post": statistics.fmean(s["post"] for s in steps),
        "pi": statistics.fmean(s["norms"]["pi"] for s in steps),
        "vf": statistics.fmean(s["norms"]["vf"] for s in steps),
        "last_pre": steps[-1]["norms"]["total"],
    }


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """One real GET /metrics, parsed: (sample name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    (value,) = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return value


def _weights(algo: Any) -> dict[str, dict[str, torch.Tensor]]:
    return {mid: {k: torch.as_tensor(v) for k, v in w.items()} for mid, w in algo.learner_group.get_weights().items()}


# -- tests ---------------------------------------------------------------------------------


def test_multidiscrete_heads_are_row_slices_and_their_log_ratios_add_up_to_rllibs_joint_one() -> None:
    """No cluster needed: RLlib's own default PPO module and its own MultiCategorical distribution."""
    space = gym.spaces.MultiDiscrete([3, 2, 4])
    module = RLModuleSpec(
        module_class=DefaultPPOTorchRLModule,
        observation_space=gym.spaces.Box(-1.0, 1.0, (5,)),
        action_space=space,
        model_config={"fcnet_hiddens": [16]},
    ).build()
    heads = module_heads(module)
    assert list(heads) == ["pi.0", "pi.1", "pi.2"]
    assert [h[1] for h in heads.values()] == [slice(0, 3), slice(3, 5), slice(5, 9)]  # type: ignore[index]
    assert all(h[0] is module.pi.net.mlp[-1] for h in heads.values())  # type: ignore[index]
    assert set(module_groups(module)) == {"vf", "encoder"}

    gen = torch.Generator().manual_seed(0)
    old, new = torch.randn(32, 9, generator=gen), torch.randn(32, 9, generator=gen)
    dist = TorchMultiCategorical.from_logits(old, input_lens=[3, 2, 4])
    actions = dist.sample()
    old_logp = dist.logp(actions)
    new_logp = TorchMultiCategorical.from_logits(new, input_lens=[3, 2, 4]).logp(actions)
    batch = {Columns.ACTIONS: actions, Columns.ACTION_LOGP: old_logp, Columns.ACTION_DIST_INPUTS: old}
    ratios = log_ratios(module, {Columns.ACTION_DIST_INPUTS: new}, batch)
    assert list(ratios) == list(heads)
    joint = torch.stack(list(ratios.values())).sum(0)
    assert torch.allclose(joint, new_logp - old_logp, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "match"),
    [
        (lambda: _config().training(grad_clip=1.0, grad_clip_by="value"), {}, ValueError, "clips gradients by 'value'"),
        (_config, {"heads": {}}, TypeError, "sets 'heads' itself"),
        (_config, {"const_labels": {"module": "x"}}, ValueError, "const label 'module'"),
        (_config, {"port_by": "node"}, ValueError, "port_by must be one of"),
        (lambda: instrument(_config(), base_port=0), {}, ValueError, "already instrumented"),
        (lambda: _config().learners(learner_class=object), {}, TypeError, "PPOTorchLearner"),
    ],
    ids=["value clip", "heads", "module label", "port_by", "twice", "not a PPO learner"],
)
def test_instrument_refuses_at_once_what_it_cannot_measure(
    make: Callable[[], Any], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        instrument(make(), base_port=9842, **kwargs)


def test_one_local_learner_publishes_what_rllib_computes_and_trains_the_same_weights(
    ray_cluster: None, tmp_path: Path
) -> None:
    plain = _config(learner=None).build_algo()  # RLlib's own PPOTorchLearner, no telemetry
    try:
        for _ in range(3):
            plain.train()
        expected_weights = _weights(plain)
    finally:
        plain.stop()

    base = _free_ports(1)
    targets = tmp_path / "targets"
    algo = instrument(_config(), base_port=base, file_sd=targets, const_labels={"run": "local"}).build_algo()
    try:
        (target,) = targets.glob("*.json")
        assert json.loads(target.read_text())[0]["targets"] == [f"127.0.0.1:{base}"]
        for iteration in range(1, 4):
            result = algo.train()["learners"]["default_policy"]
            (recorded,) = _on_learners(algo, lambda learner: learner.take())
            want = _referee_values(recorded, "default_policy")
            got = _scrape(base)
            labels = {"module": "default_policy", "run": "local"}
            assert _value(got, "tele_ppo_updates_total", **labels) == iteration  # one publish per iteration
            # RLlib's own reported values (its last minibatch's, window=1), exactly.
            assert _value(got, "tele_policy_entropy", **labels) == result["entropy"]
            assert _value(got, "tele_explained_variance", **labels) == result["vf_explained_var"]
            assert want["last_pre"] == pytest.approx(result["gradients_default_optimizer_global_norm"], rel=1e-6)
            # Means over the iteration's minibatches of RLlib's compute_global_norm, before and after its clip.
            assert _value(got, "tele_policy_grad_norm", clip="pre", **labels) == pytest.approx(want["pre"], rel=1e-5)
            assert _value(got, "tele_policy_grad_norm", clip="post", **labels) == pytest.approx(want["post"], rel=1e-5)
            assert want["pre"] > GRAD_CLIP and want["clip_fraction"] > 0  # the clips did something to compare
            assert _value(got, "tele_head_grad_norm", head="pi", kind="action") == pytest.approx(want["pi"], rel=1e-5)
            assert _value(got, "tele_head_grad_norm", head="vf", kind="other") == pytest.approx(want["vf"], rel=1e-5)
            # k3 KL and clip fraction of the loss's own tensors, loss mask applied, averaged over minibatches.
            assert _value(got, "tele_kl_divergence", **labels) == pytest.approx(want["kl"], rel=1e-4, abs=1e-9)
            assert _value(got, "tele_ppo_clip_fraction", **labels) == pytest.approx(want["clip_fraction"], abs=1e-12)
            assert _value(got, "tele_world_size", **labels) == 1.0
            assert not any(("rank", r) in ls for (_, ls) in got for r in ("0", "1"))  # one learner: no rank label
            assert _value(got, "tele_nonfinite_gradients_total", head="pi", value="nan") == 0.0
        assert _on_learners(algo, lambda learner: learner.tele["default_policy"].errors()) == [{}]
        got_weights = _weights(algo)
        tele = algo.learner_group._learner.tele["default_policy"]
        assert not tele.snapshot().finished
    finally:
        algo.stop()
    assert tele.snapshot().finished  # algo.stop() is a clean end: tele_run_finished 1, no absence alert
    assert not list(targets.glob("*.json"))  # the learner's target left with it
    diffs = [(got_weights[m][k] - w).abs().max().item() for m, ws in expected_weights.items() for k, w in ws.items()]
    assert max(diffs) <= 1e-6, max(diffs)


def test_multi_agent_modules_are_labelled_and_nan_gradients_are_counted_before_rllib_zeroes_them(
    ray_cluster: None,
) -> None:
    config = _config(env=MultiAgentCartPole).multi_agent(
        policies={"p0", "p1"}, policy_mapping_fn=lambda agent_id, *args, **kwargs: f"p{agent_id}"
    )
    config.environment(env_config={"num_agents": 2})
    base = _free_ports(1)
    algo = instrument(config, base_port=base).build_algo()
    try:
        result = algo.train()["learners"]
        first = _scrape(base)
        _on_learners(algo, lambda learner: learner.poison.add("p1"))  # one NaN in p1's pi gradient, next minibatch
        result = algo.train()["learners"]
        got = _scrape(base)
        weights = _weights(algo)
    finally:
        algo.stop()
    for module in ("p0", "p1"):
        assert _value(first, "tele_ppo_updates_total", module=module) == 1.0
        assert _value(got, "tele_ppo_updates_total", module=module) == 2.0
        assert _value(got, "tele_policy_entropy", module=module) == result[module]["entropy"]
        assert _value(got, "tele_explained_variance", module=module) == result[module]["vf_explained_var"]
    assert _value(got, "tele_nonfinite_gradients_total", module="p1", head="pi", value="nan") == 1.0
    assert _value(got, "tele_nonfinite_gradients_total", module="p1", head="pi", value="inf") == 0.0
    assert _value(got, "tele_nonfinite_gradients_total", module="p0", head="pi", value="nan") == 0.0
    assert _value(got, "tele_nonfinite_gradients_total", module="p1", head="vf", value="nan") == 0.0
    assert math.isnan(_value(got, "tele_policy_grad_norm", module="p1", clip="pre"))  # RLlib counts that norm as 0
    assert all(torch.isfinite(w).all() for ws in weights.values() for w in ws.values())  # RLlib zeroed the NaN


def test_two_learner_actors_train_the_same_weights_as_a_plain_run(ray_cluster: None, tmp_path: Path) -> None:
    """DDP over gloo between two learner actors, RLlib's global-norm clip: bit for bit what a plain run trains."""
    weights = []
    base = 0
    targets = tmp_path / "targets"
    for instrumented in (False, True):
        config = _config(num_learners=2, learner=None)
        if instrumented:
            base = _free_ports(2)
            instrument(config, base_port=base, port_by="local_rank", file_sd=targets)
        algo = config.build_algo()
        try:
            for _ in range(2):
                algo.train()
            if instrumented:  # it did measure; one node: the learners' ranks on it are 0 and 1, as torchrun's would be
                served = _on_learners(
                    algo, lambda learner: (learner.tele_server.port, learner.tele["default_policy"].snapshot().updates)
                )
                assert served == [(base, 2), (base + 1, 2)]
                assert sorted(re.sub("-[0-9a-f]{12}-", "-RUN-", p.name) for p in targets.glob("*.json")) == [
                    "rllib-RUN-0.json",
                    "rllib-RUN-1.json",
                ]
            weights.append(_weights(algo))
        finally:
            algo.stop()
    plain, got = weights
    diffs = [(got[m][k] - w).abs().max().item() for m, ws in plain.items() for k, w in ws.items()]
    assert max(diffs) <= 1e-6, max(diffs)
    assert not list(targets.glob("*.json"))  # algo.stop() removed the run's targets, in the driver


# -- two learner actors under a real Prometheus ---------------------------------------------------


def _prometheus_config(targets: Path) -> str:
    """The scrape job docs/rllib.md shows: the learners' file_sd directory, honor_labels; 1 s scrapes."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": ["rules/*.yml"],
        "scrape_configs": [
            {
                "job_name": "tele",
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets / "*.json")], "refresh_interval": "1s"}],
            }
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


def _active(prom: Running, alertname: str, **labels: str) -> list[dict[str, Any]]:
    return [
        a
        for a in prom.alerts()
        if a["labels"].get("alertname") == alertname and all(a["labels"].get(k) == v for k, v in labels.items())
    ]


def _query(prom: Running, promql: str) -> list[tuple[dict[str, str], float]]:
    return [(r["metric"], float(r["value"][1])) for r in prom.query(promql)]


@pytest.mark.servers
def test_two_learner_actors_under_a_real_prometheus_are_ranks(ray_cluster: None, tmp_path: Path) -> None:
    """Each learner actor serves on base + its index with its torch.distributed rank; Prometheus finds both
    through file_sd, and the generated rank rules count, compare and miss learners as they do torchrun ranks.
    """
    base = _free_ports(2)
    targets = tmp_path / "targets"
    targets.mkdir()  # before Prometheus starts: it watches the directory
    config = instrument(_config(num_learners=2), base_port=base, file_sd=targets, const_labels={"training_job": "rl"})
    with start_prometheus(_prometheus_config(targets), RULE_FILES) as prom:
        algo = config.build_algo()
        stopped: list[int] = []
        try:
            pids = _on_learners(algo, lambda learner: (learner._learner_index, os.getpid(), learner.tele_server.pid))
            assert [i for i, _, _ in pids] == [0, 1]
            files = {json.loads(p.read_text())[0]["targets"][0] for p in targets.glob("rllib-*.json")}
            assert files == {f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"}
            for _ in range(3):
                result = algo.train()["learners"]["default_policy"]
                recorded = _on_learners(algo, lambda learner: learner.take())  # the last iteration's, per learner
            scraped = [_scrape(base), _scrape(base + 1)]
            for rank, got in enumerate(scraped):
                assert _value(got, "tele_world_size", rank=str(rank), module="default_policy") == 2.0
                assert _value(got, "tele_ppo_updates_total", rank=str(rank), training_job="rl") == 3.0
                # DDP all-reduced the gradients: every learner measures the same norms, RLlib's own.
                want = _referee_values(recorded[rank], "default_policy")
                assert _value(got, "tele_policy_grad_norm", clip="pre") == pytest.approx(want["pre"], rel=1e-5)
                assert _value(got, "tele_kl_divergence") == pytest.approx(want["kl"], rel=1e-4, abs=1e-9)
            # RLlib's result dict is the mean over its learners of each learner's last-minibatch value.
            for name, key in (("tele_policy_entropy", "entropy"), ("tele_explained_variance", "vf_explained_var")):
                per_rank = [_value(got, name) for got in scraped]
                assert statistics.fmean(per_rank) == pytest.approx(result[key], rel=1e-9, abs=1e-12)

            def counted(record: str, expected: float) -> Callable[[], bool]:
                return lambda: [v for _, v in _query(prom, record)] == [expected]

            poll(lambda: len(_query(prom, 'tele_ppo_updates_total{job="tele"} >= 3')) == 2, 60, what="both scraped")
            poll(counted("job:tele_ranks:count", 2.0), 30, what="2 learners up")
            poll(counted("job:tele_world_size:max", 2.0), 30, what="world size 2")
            instances = {m["instance"]: m["rank"] for m, _ in _query(prom, 'tele_world_size{job="tele"}')}
            assert instances == {f"127.0.0.1:{base}": "0", f"127.0.0.1:{base + 1}": "1"}
            assert not _active(prom, "TeleRanksMissing") and not _active(prom, "TeleRankLagging")

            # Learner 1's telemetry stops publishing while its /metrics answers and DDP trains on (a stand-in
            # for a telemetry that hangs: a learner that hangs itself blocks its peer in the next all-reduce).
            _on_learners(algo, lambda learner: _pause(learner, learner._learner_index == 1))
            deadline = time.monotonic() + 120
            while not _active(prom, "TeleRankLagging", rank="1", training_job="rl"):
                assert time.monotonic() < deadline, "TeleRankLagging never went pending for learner 1"
                algo.train()
            (lagging,) = _active(prom, "TeleRankLagging")
            assert lagging["labels"]["instance"] == f"127.0.0.1:{base + 1}" and float(lagging["value"]) > 3

            # Learner 1 stopped outright, with its serving process (as when its node is lost): its scrapes
            # time out and the job has fewer learners up than its world size.
            stopped = [pid for pid in pids[1][1:] if pid is not None]
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            poll(lambda: bool(_active(prom, "TeleRanksMissing", training_job="rl")), 60, what="TeleRanksMissing")
            poll(counted("job:tele_ranks:count", 1.0), 30, what="1 learner up")
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            stopped = []
            algo.train()  # both learners train on
            poll(counted("job:tele_ranks:count", 2.0), 30, what="2 learners up again")
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            algo.stop()
    assert not list(targets.glob("*.json"))


def _pause(learner: Any, pause: bool) -> None:
    """Switch a learner's telemetry off (it keeps serving its last update), or leave it."""
    if pause:
        for tele in learner.tele.values():
            tele.enabled = False


def _free_ports(count: int) -> int:
    """A base port whose `count` ports are free, between Ray's worker ports (10002-19999) and the
    ephemeral range (32768-) that Ray, gloo and the kernel pick from while the learners build."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        if all(bindable(p) for p in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} adjacent free ports in 20000-32000")


# -- docs/rllib.md ---------------------------------------------------------------------------


def _doc_files() -> dict[str, str]:
    text = (ROOT / "docs" / "rllib.md").read_text()
    return dict(re.findall(r"<!-- file: (\S+) -->\n```yaml\n(.*?)```", text, re.S))


def test_the_kuberay_example_is_a_rayjob_and_a_podmonitor_scraping_the_learners_port() -> None:
    """Not run on Kubernetes (none here): well-formed documents of the right kinds, ports that agree."""
    files = _doc_files()
    job = yaml.safe_load(files["rayjob.yaml"])
    monitor = yaml.safe_load(files["podmonitor.yaml"])
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"tele": 9842}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= workers["template"]["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["tele"]


@pytest.mark.servers
def test_the_doc_prometheus_configs_pass_promtool(tmp_path: Path) -> None:
    files = _doc_files()
    (tmp_path / "rules").mkdir()
    for rules in RULE_FILES:
        shutil.copy(rules, tmp_path / "rules" / rules.name)
    for name in ("prometheus-file-sd.yml", "prometheus-ray.yml"):
        (tmp_path / name).write_text(files[name])
        result = subprocess.run(
            ["promtool", "check", "config", name], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"promtool check config {name}: {result.stdout}{result.stderr}"
