"""Ray RLlib: PPO's learners instrumented with one call, each serving its own /metrics like a torchrun rank.

`instrument(config, base_port=9842)` swaps the config's learner class for a subclass of it
(a user's own `PPOTorchLearner` subclass is kept: the telemetry sits above it in the MRO).
Every learner serves on `base_port + learner index` (the single local learner of
`num_learners=0` on `base_port`, in the driver; `port_by="local_rank"`: + its rank on its
node) and, given `file_sd=DIR`, writes a file_sd target there. Under `num_learners > 1`
RLlib's LearnerGroup has initialised `torch.distributed`, so the series carry the `rank`
label and `tele_world_size` is the number of learners: the generated rank rules treat
learners as torchrun ranks.

Per RLModule, one `Telemetry` and one update per training iteration (`Learner.update`):

* gradients: RLlib computes them with `backward()`, then hands a dict keyed by the Parameter
  objects to `postprocess_gradients_for_module`, which clips in place. They are measured
  there, before the clip, with `Update.observe_gradients(grad_clip)`: the pre-clip norms from
  the tensors RLlib is about to clip, the post-clip norm that RLlib's global-norm clip leaves
  (its coefficient is torch's, min(1, grad_clip / (norm + 1e-6))); no gradient is touched,
  RLlib still clips with its own code, so training is bit-for-bit unchanged. Each dict value
  is set as its Parameter's `.grad` for the measurement if it is not already that tensor.
  NaN and Inf are counted here, before `apply_gradients` zeroes them.
* KL and clip fraction: from the loss's own tensors, `fwd_out`'s action-distribution inputs
  and the batch's actions and old log-probs, with RLlib's loss mask (no second forward pass,
  no host sync); both are the mean over every minibatch of the iteration.
* entropy and explained variance: RLlib's own reported values (`entropy`, `vf_explained_var`),
  read from the results `Learner.update` returns, so they equal the result dict's.

Modules are told apart by a `module` label on every series (one Telemetry per module, all
served from the learner's one port), not by ports: a module's series keep the rank rules'
grouping (a learner is one scrape target, `up` counts learners) and multi-agent dashboards
filter on one label.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import os
import platform
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from ray.rllib.algorithms.ppo.ppo import LEARNER_RESULTS_VF_EXPLAINED_VAR_KEY
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import ENTROPY_KEY
from torch import Tensor, nn

from ..catalog import Catalog
from ..measure.heads import HeadSpec
from ..server.http import DEFAULT_ADDR, PortInUseError, Server, serve
from ..snapshot import Snapshot
from ..telemetry.telemetry import Telemetry, Update

log = logging.getLogger("tele_exporter")

MODULE_LABEL = "module"
"""The label that tells a learner's RLModules apart on every series."""

PORT_BY = ("learner_index", "local_rank")
"""What a learner adds to base_port: its index in the LearnerGroup, or its rank on its node (LOCAL_RANK)."""

_NOT_TELEMETRY_KWARGS = ("policy", "heads", "groups", "registry")


@dataclass(frozen=True)
class _Settings:
    """What `instrument` was given, carried to every learner with its class (picklable for Ray)."""

    base_port: int
    addr: str
    file_sd: str | None
    linger: float
    port_by: str
    run: str  # names this run's target files, so the driver can remove them all at algo.stop()
    telemetry_kwargs: Mapping[str, Any] = field(default_factory=dict)


def instrument(
    config: Any,
    *,
    base_port: int,
    addr: str = DEFAULT_ADDR,
    file_sd: str | os.PathLike[str] | None = None,
    linger: float = 0.0,
    port_by: str = "learner_index",
    **telemetry_kwargs: Any,
) -> Any:
    """Instrument a PPO `AlgorithmConfig` (torch) in place and return it.

    Each learner serves /metrics on `base_port + learner index` (base_port 0: any free port) on
    `addr`, writes a file_sd target into the directory `file_sd` when given, and waits up to
    `linger` seconds at shutdown for a scrape of its last update. `port_by="local_rank"` adds
    the learner's rank among the learners on its node instead, as torchrun ranks add LOCAL_RANK:
    every node's first learner serves on base_port, as one learner per Kubernetes pod wants.
    `telemetry_kwargs` go to every module's `Telemetry` (const_labels, thresholds, enabled, ...);
    heads and groups come from the module (`module_heads`, `module_groups`), and each module
    adds its `module` label.
    """
    base = _learner_class(config)
    if not (isinstance(base, type) and issubclass(base, PPOTorchLearner)):
        raise TypeError(
            f"instrument needs a PPO config whose learner class is a PPOTorchLearner (framework torch), got {base!r}"
        )
    if issubclass(base, TelemetryLearner):
        raise ValueError(f"this config's learner class {base.__name__} is already instrumented")
    if port_by not in PORT_BY:
        raise ValueError(f"port_by must be one of {PORT_BY}, got {port_by!r}")
    if not 0 <= base_port <= 65535:
        raise ValueError(f"base_port must be in 0..65535, got {base_port}")
    taken = [k for k in _NOT_TELEMETRY_KWARGS if k in telemetry_kwargs]
    if taken:
        raise TypeError(f"instrument sets {taken[0]!r} itself for every module; it cannot be passed")
    labels = telemetry_kwargs.get("const_labels") or {}
    if MODULE_LABEL in labels:
        raise ValueError(f"const label {MODULE_LABEL!r} is set per RLModule by instrument")
    _check_clip(config.grad_clip, config.grad_clip_by, "the config")
    settings = _Settings(
        int(base_port),
        addr,
        None if file_sd is None else str(Path(file_sd).resolve()),
        float(linger),
        port_by,
        uuid.uuid4().hex[:12],
        dict(telemetry_kwargs),
    )
    bases = (TelemetryLearner,) if base is PPOTorchLearner else (TelemetryLearner, base)
    cls = type(f"Tele{base.__name__}", bases, {"_tele_settings": settings, "__module__": __name__})
    config.learners(learner_class=cls)
    _close_learners_at_stop(config, settings)
    return config


def module_heads(module: nn.Module) -> dict[str, HeadSpec]:
    """A PPO RLModule's action head: `pi`, or a row slice of its last Linear per MultiDiscrete sub-action."""
    pi = getattr(module, "pi", None)
    if not isinstance(pi, nn.Module) or not any(True for _ in pi.parameters()):
        raise TypeError(f"{type(module).__name__} has no policy head `pi` with parameters (RLlib's default PPO module)")
    sizes = _sub_action_sizes(getattr(module, "action_space", None))
    if sizes is None:
        return {"pi": pi}
    last = [m for m in pi.modules() if isinstance(m, nn.Linear)]
    if not last or last[-1].out_features != sum(sizes):
        raise ValueError(
            f"{type(module).__name__}.pi: its last Linear layer must output the {sum(sizes)} logits of "
            f"the MultiDiscrete sub-actions {sizes}"
        )
    heads: dict[str, HeadSpec] = {}
    start = 0
    for i, n in enumerate(sizes):
        heads[f"pi.{i}"] = (last[-1], slice(start, start + n))
        start += n
    return heads


def module_groups(module: nn.Module) -> dict[str, HeadSpec]:
    """The other measured parts of a PPO RLModule, outside the gradient CV: its value head `vf` and its `encoder`."""
    groups: dict[str, HeadSpec] = {}
    for name in ("vf", "encoder"):
        part = getattr(module, name, None)
        if isinstance(part, nn.Module) and any(True for _ in part.parameters()):
            groups[name] = part
    return groups


def log_ratios(module: Any, fwd_out: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """Per action head, log pi_new - log pi_old of the batch's actions, from the loss's own tensors; detached.

    A Discrete or Box space has one head `pi`: the new log-prob comes from the module's train
    distribution over `fwd_out`'s inputs, the old one is the batch's ACTION_LOGP, as in RLlib's
    loss. A MultiDiscrete space has one head per sub-action (`pi.0`, ...): categorical
    log-probs of each sub-action from the new and the old (batch) logits.
    """
    with torch.no_grad():
        new_inputs = fwd_out[Columns.ACTION_DIST_INPUTS].detach()
        actions = batch[Columns.ACTIONS]
        sizes = _sub_action_sizes(getattr(module, "action_space", None))
        if sizes is None:
            dist = module.get_train_action_dist_cls().from_logits(new_inputs)
            return {"pi": dist.logp(actions).detach() - batch[Columns.ACTION_LOGP]}
        old_inputs = batch[Columns.ACTION_DIST_INPUTS]
        out: dict[str, Tensor] = {}
        for i, (new, old) in enumerate(zip(new_inputs.split(sizes, -1), old_inputs.split(sizes, -1), strict=True)):
            a = actions[..., i].long().unsqueeze(-1)
            out[f"pi.{i}"] = (new.log_softmax(-1).gather(-1, a) - old.log_softmax(-1).gather(-1, a)).squeeze(-1)
        return out


class TelemetryLearner(PPOTorchLearner):  # type: ignore[misc,unused-ignore]
    """A PPOTorchLearner that measures every RLModule it trains and serves the learner's /metrics.

    `instrument` builds a subclass of it (above the config's own learner class) that carries its
    settings; it is not meant to be used directly.
    """

    _tele_settings: ClassVar[_Settings]

    # -- RLlib's hooks -----------------------------------------------------------------

    def build(self) -> None:
        """RLlib's build, then one Telemetry per RLModule and this learner's server (and file_sd target)."""
        super().build()
        self.tele: dict[str, Telemetry] = {}
        self._tele_open: dict[str, Update] | None = None
        self.tele_server: Server | None = None
        self._tele_target: Path | None = None
        self._tele_closed = False
        for module_id in list(self.module.keys()):
            self._tele_add(module_id)
        self._tele_serve()

    def update(self, *args: Any, **kwargs: Any) -> Any:
        """RLlib's update (every epoch and minibatch of one training iteration), published once at its end."""
        self._tele_open = {}
        try:
            results = super().update(*args, **kwargs)
            self._tele_observe_results(results)
            return results
        finally:
            opened, self._tele_open = self._tele_open, None
            for upd in opened.values():
                upd.__exit__(None, None, None)

    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: Any, fwd_out: Any) -> Any:
        """RLlib's PPO loss, then k3 KL and clip fraction from its own tensors (no forward pass, no host sync)."""
        loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        upd = self._tele_update(module_id)
        if upd is not None:
            try:
                module = self.module[module_id].unwrapped()
                ratios = log_ratios(module, fwd_out, batch)
                mask = batch.get(Columns.LOSS_MASK)
                masks = None if mask is None else {head: mask for head in ratios}
                upd.observe_kl(ratios, masks)
                upd.observe_ratios(ratios, masks, clip_eps=float(config.clip_param))
            except Exception as exc:
                self.tele[module_id].record_error("rllib_loss", exc)
        return loss

    def postprocess_gradients_for_module(
        self, *, module_id: str, config: Any = None, module_gradients_dict: dict[Any, Any]
    ) -> Any:
        """Measure the gradients RLlib is about to clip (and the norm its clip leaves), then let it clip."""
        upd = self._tele_update(module_id)
        if upd is not None:
            cfg = config if config is not None else self.config.get_config_for_module(module_id)
            max_norm = cfg.grad_clip if cfg.grad_clip is not None and cfg.grad_clip_by == "global_norm" else None
            with _as_grads(module_gradients_dict):
                upd.observe_gradients(max_norm)
        return super().postprocess_gradients_for_module(
            module_id=module_id, config=config, module_gradients_dict=module_gradients_dict
        )

    def add_module(self, *, module_id: str, **kwargs: Any) -> Any:
        """RLlib's add_module; the new module is measured and served from its first update."""
        spec = super().add_module(module_id=module_id, **kwargs)
        if getattr(self, "tele_server", None) is not None:
            self._tele_add(module_id)
        return spec

    def remove_module(self, module_id: str, **kwargs: Any) -> Any:
        """Stop measuring the module, then RLlib's remove_module."""
        tele = getattr(self, "tele", {}).pop(module_id, None)
        if tele is not None:
            tele.close()
        return super().remove_module(module_id, **kwargs)

    def shutdown(self) -> None:
        """Close the telemetry first, as a clean end (the local learner's path; Ray Train ends actors without it)."""
        self.tele_close(finished=True)
        super().shutdown()

    # -- public --------------------------------------------------------------------

    def tele_close(self, finished: bool = False) -> None:
        """Stop serving (after up to `linger` s for a scrape of the last update), drop the target, close telemetry.

        `finished=True` (algo.stop()) first marks every module's run finished, so that no absence
        alert pages for a run that ended cleanly; at a process exit without it, the run counts as
        gone. A second call does nothing.
        """
        atexit.unregister(self.tele_close)
        if getattr(self, "_tele_closed", True):
            return
        self._tele_closed = True
        if finished:
            for tele in self.tele.values():
                tele.finish()
        server, self.tele_server = getattr(self, "tele_server", None), None
        if server is not None:
            server.close()
        target, self._tele_target = getattr(self, "_tele_target", None), None
        if target is not None:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        for tele in getattr(self, "tele", {}).values():
            tele.close()

    # -- internals -----------------------------------------------------------------

    def _tele_add(self, module_id: str) -> None:
        """One Telemetry over one RLModule (the DDP wrapper's inner module), labelled with its id."""
        module = self.module[module_id]
        inner = module.unwrapped() if hasattr(module, "unwrapped") else module
        if not isinstance(inner, nn.Module):
            log.warning("RLModule %r is not a torch module: not measured", module_id)
            return
        cfg = self.config.get_config_for_module(module_id)
        _check_clip(cfg.grad_clip, cfg.grad_clip_by, f"RLModule {module_id!r}")
        optimizers = self._module_optimizers.get(module_id, [])
        if len(optimizers) > 1 and cfg.grad_clip is not None:
            raise ValueError(
                f"RLModule {module_id!r} has {len(optimizers)} optimizers, which RLlib clips one by one: "
                "tele-exporter measures one global norm per module"
            )
        kwargs = dict(self._tele_settings.telemetry_kwargs)
        labels = {**dict(kwargs.pop("const_labels", None) or {}), MODULE_LABEL: str(module_id)}
        self.tele[module_id] = Telemetry(
            inner, heads=module_heads(inner), groups=module_groups(inner), const_labels=labels, **kwargs
        )

    def _tele_serve(self) -> None:
        """Serve every module of this learner on base_port + learner index (or LOCAL_RANK); write its target."""
        settings = self._tele_settings
        index = int(getattr(self, "_learner_index", 0) or 0)
        by_rank = settings.port_by == "local_rank"
        offset = _node_local_rank() if by_rank else index
        port = settings.base_port + offset if settings.base_port else 0
        try:
            self.tele_server = serve(_LearnerSource(self.tele), port, settings.addr, linger=settings.linger)
        except PortInUseError as exc:
            raise PortInUseError(
                exc.errno,
                f"learner {index}: cannot serve on {settings.addr}:{port} (base port {settings.base_port} + "
                f"{'LOCAL_RANK' if by_rank else 'learner index'} {offset}): the port is taken; give each RLlib "
                "run on a host its own range of base ports, as many as its learners there (at least 1)",
            ) from None
        if settings.file_sd is not None and self.tele_server.running:
            self._tele_target = _write_target(settings, index, self.tele_server, self.tele)
        atexit.register(self.tele_close)

    def _tele_update(self, module_id: str) -> Update | None:
        """This iteration's open update of a module, opened at its first minibatch; None outside `update`."""
        opened = self._tele_open
        if opened is None:
            return None
        upd = opened.get(module_id)
        if upd is None:
            tele = self.tele.get(module_id)
            if tele is None:
                return None
            upd = opened[module_id] = tele.update().__enter__()
        return upd

    def _tele_observe_results(self, results: Any) -> None:
        """RLlib's own entropy and explained variance of the iteration (its last minibatch's, window=1)."""
        if not isinstance(results, Mapping) or self._tele_open is None:
            return
        for module_id, upd in self._tele_open.items():
            stats = results.get(module_id)
            if not isinstance(stats, Mapping):
                continue
            try:
                entropy = _reported(stats.get(ENTROPY_KEY))
                if entropy is not None:
                    upd.observe_entropy_value(entropy)
                use_critic = bool(getattr(self.config.get_config_for_module(module_id), "use_critic", True))
                ev = _reported(stats.get(LEARNER_RESULTS_VF_EXPLAINED_VAR_KEY))
                if ev is not None and use_critic:
                    upd.observe_explained_variance_value(ev)
            except Exception as exc:
                self.tele[module_id].record_error("rllib_results", exc)


class _LearnerSource:
    """A learner's modules behind one /metrics: every module's series, each with its `module` label.

    The live page and /api/snapshot show the first module's snapshot.
    """

    def __init__(self, teles: Mapping[str, Telemetry]) -> None:
        if not teles:
            raise ValueError("this learner has no torch RLModule to measure")
        self._teles = teles
        self.registry = CollectorRegistry()
        self.registry.register(_Merged(teles))
        self.owns_registry = False  # several snapshots change it: never cached by one

    @property
    def _first(self) -> Telemetry:
        return next(iter(self._teles.values()))

    @property
    def catalog(self) -> Catalog:
        return self._first.catalog

    @property
    def const_labels(self) -> Mapping[str, str]:
        return self._first.const_labels

    @property
    def enabled(self) -> bool:
        return self._first.enabled

    def snapshot(self) -> Snapshot:
        return self._first.snapshot()

    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for tele in self._teles.values():
            for site, count in tele.errors().items():
                out[site] = out.get(site, 0) + count
        return out


class _Merged(Collector):
    """Every module's families merged by name, so each metric is one family with a series per module."""

    def __init__(self, teles: Mapping[str, Telemetry]) -> None:
        self._teles = teles

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for tele in list(self._teles.values()):
            for family in tele.registry.collect():
                into = merged.get(family.name)
                if into is None:
                    merged[family.name] = family
                else:
                    into.samples.extend(family.samples)
        yield from merged.values()


@contextlib.contextmanager
def _as_grads(gradients: Mapping[Any, Any]) -> Iterator[None]:
    """Set each gradient in RLlib's dict (keyed by Parameter) as its Parameter's `.grad` while measuring."""
    swapped: list[tuple[nn.Parameter, Tensor | None]] = []
    try:
        for param, grad in gradients.items():
            if isinstance(param, nn.Parameter) and param.grad is not grad:
                swapped.append((param, param.grad))
                param.grad = grad
        yield
    finally:
        for param, old in swapped:
            param.grad = old


def _reported(stat: Any) -> float | None:
    """A value from Learner.update's reduced results (a Stats object or a number) as a float; None if absent."""
    if stat is None:
        return None
    value = stat.peek() if hasattr(stat, "peek") else stat
    if isinstance(value, Tensor):
        value = value.item()
    if isinstance(value, (list, tuple)):
        value = value[-1] if value else None
    return None if value is None else float(value)


def _node_local_rank() -> int:
    """This learner's rank among the learners on its node (torchrun's LOCAL_RANK), 0 without torch.distributed.

    RLlib never starts a Ray Train session, so LOCAL_RANK is not set in its learners: the learners
    exchange their node addresses once, with one all_gather_object at build (every learner builds at once).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    import ray.util

    node = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return sum(1 for other in nodes[: dist.get_rank()] if other == node)


def _sub_action_sizes(space: Any) -> list[int] | None:
    """The sub-action sizes of a MultiDiscrete space; None for any other space."""
    if isinstance(space, gym.spaces.MultiDiscrete):
        return [int(n) for n in space.nvec.flatten()]
    return None


def _check_clip(grad_clip: float | None, grad_clip_by: str, what: str) -> None:
    """Refuse clip modes whose post-clip norm does not follow from the pre-clip one (only global_norm does)."""
    if grad_clip is not None and grad_clip_by != "global_norm":
        raise ValueError(
            f"{what} clips gradients by {grad_clip_by!r}: tele-exporter measures RLlib's grad_clip only with "
            "grad_clip_by='global_norm' (PPO's default), whose post-clip norm follows from the pre-clip norm"
        )


def _learner_class(config: Any) -> Any:
    """The config's learner class; an import path (RLlib allows one) is imported."""
    cls = config.learner_class
    if isinstance(cls, str):
        module, _, name = cls.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    return cls


def _close_learners_at_stop(config: Any, settings: _Settings) -> None:
    """Make `algo.stop()` close every learner's telemetry as a clean end, then remove the run's targets.

    Ray Train ends learner actors without `Learner.shutdown`, and kills those that do not exit
    within a few seconds: the algorithm class is subclassed (a user's own is kept) so that its
    `cleanup` first has each learner, still alive, mark its run finished, wait its linger for
    a scrape and close, and at the end removes whatever target file of this run is left.
    """
    algo: Any = config.algo_class
    if isinstance(algo, str):
        from ray.tune.registry import get_trainable_cls

        algo = get_trainable_cls(algo)  # type: ignore[no-untyped-call]
    if not isinstance(algo, type):
        return
    base: Any = algo

    def cleanup(self: Any) -> None:
        try:
            group = getattr(self, "learner_group", None)
            if group is not None:
                group.foreach_learner(
                    lambda learner: learner.tele_close(finished=True), timeout_seconds=settings.linger + 30.0
                )
        except Exception as exc:  # a learner already gone: its telemetry went with it
            log.warning("closing the learners' telemetry at stop: %s", exc)
        try:
            base.cleanup(self)
        finally:
            if settings.file_sd is not None:
                for path in _run_targets(settings):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()

    config.algo_class = type(f"Tele{algo.__name__}", (algo,), {"cleanup": cleanup, "__module__": __name__})


def _run_targets(settings: _Settings) -> list[Path]:
    """This run's target files (and any half-written one)."""
    assert settings.file_sd is not None
    return sorted(Path(settings.file_sd).glob(f"rllib-{settings.run}-*.json*"))


def _write_target(settings: _Settings, index: int, server: Server, teles: Mapping[str, Telemetry]) -> Path:
    """Write this learner's file_sd target atomically, as rllib-RUN-INDEX.json; returns its path."""
    assert settings.file_sd is not None
    host = server.addr
    if host in ("", "0.0.0.0", "::"):
        import ray.util

        host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    shown = f"[{host}]" if ":" in host else host
    labels = {"node": platform.node()}
    first = next(iter(teles.values()))
    job_label = first.catalog.job_label
    if job_label and job_label in first.const_labels:
        labels[job_label] = first.const_labels[job_label]
    directory = Path(settings.file_sd)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rllib-{settings.run}-{index}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([{"targets": [f"{shown}:{server.port}"], "labels": labels}]))
    os.replace(tmp, path)
    return path


__all__ = [
    "MODULE_LABEL",
    "PORT_BY",
    "TelemetryLearner",
    "instrument",
    "log_ratios",
    "module_groups",
    "module_heads",
]
