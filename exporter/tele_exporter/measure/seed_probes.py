"""TELE-557's seed gradient probes: the tensor hooks and engine callbacks that measure seeds against their host.

`HostProbe` measures TELE-557's ratio. A tensor hook on each parameter of a host
and of its watched seeds sees the gradient that arrives in a backward pass: one
landing in an empty .grad in a `backward()` is only marked, any other is normed
in the hook (one kernel in the gradient's precision). The hooks never keep a
gradient: that would stop autograd from stealing it into .grad and double its
memory. The first hook of a pass queues an engine callback that runs once the
pass is done and norms the marked .grad tensors with one fused kernel, nothing
more. The per-tensor norms stay on the device (no host sync) and are squared
and summed per host and seed in float64 for FOLD_PASSES passes at a time and at
the drain. docs/fidelity.md says why this and not `register_multi_grad_hook`, a
norm in every hook or a norm at the optimizer step.

`SeedProbe` measures a seed's backward gain with tensor hooks, not full backward hooks.
The forward pre-hook hands the seed a `view_as` alias of each input and hooks the
alias: a hook on the input itself would also see gradient arriving through the
host's skip path, which is not the seed's. A seed that modifies its input in
place would drop a hook on a view, so once a probe sees that (the alias's
version counter moved) it hands that seed a copy instead. The forward hook hooks
the output. Each hook only appends a device-side norm (squared and summed at
the update's publish); no host sync.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .norms import index_tensor, tensor_norm, tensor_norm_list

ErrorSink = Callable[[str, BaseException], None]
SeedKey = tuple[str, str]
MAX_PENDING_PASSES = 4096
FOLD_PASSES = 64  # a host's passes whose per-tensor norms are summed together (bounds the tensors held per host)


@dataclass
class BackwardPass:
    """Norms of the gradients reaching one forward call's inputs and outputs, in their own precision."""

    input_norms: list[Tensor] = field(default_factory=list)
    output_norms: list[Tensor] = field(default_factory=list)


def _tensors(value: Any) -> list[Tensor]:
    """Floating tensors that take part in autograd, found in a module's args or output."""
    if isinstance(value, Tensor):
        return [value] if value.requires_grad and value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _gain_norm(grad: Tensor) -> Tensor:
    """L2 norm of a gradient reaching a seed's input or output (see stats.tensor_norm)."""
    return tensor_norm(grad)


class SeedProbe:
    """Hooks one seed module and collects its backward passes until drained.

    `remove()` is idempotent and the probe is a context manager, like
    torch.utils.hooks.RemovableHandle.
    """

    def __init__(self, module: nn.Module, on_error: ErrorSink, site: str = "seed_hook") -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"watch_seed needs an nn.Module, got {type(module).__name__}")
        self.module = module
        self._on_error = on_error
        self._site = site
        self._lock = threading.Lock()
        self._passes: list[BackwardPass] = []
        self._current: BackwardPass | None = None
        self._taps: list[tuple[Tensor, int]] = []
        self.copies_inputs = False  # set once the seed is seen modifying its input in place
        self._handles: list[RemovableHandle] = [
            module.register_forward_pre_hook(self._before_forward),
            module.register_forward_hook(self._after_forward),
        ]

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Detach the hooks; safe to call more than once."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        with self._lock:
            self._passes.clear()

    def drain(self) -> list[BackwardPass]:
        """The passes recorded since the last drain."""
        with self._lock:
            passes, self._passes = self._passes, []
        return passes

    def __enter__(self) -> SeedProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def _before_forward(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        self._current = None
        self._taps = []
        if not torch.is_grad_enabled():
            return None
        try:
            record = BackwardPass()
            tapped = tuple(self._tap(a, record) for a in args)
            self._current = record
            return tapped
        except Exception as exc:  # telemetry must never break the forward pass
            self._on_error(self._site, exc)
            return None

    def _tap(self, arg: Any, record: BackwardPass) -> Any:
        """An alias of a grad-requiring tensor whose hook sees only the seed's own gradient."""
        if not (isinstance(arg, Tensor) and arg.requires_grad and arg.is_floating_point()):
            return arg
        alias = arg.clone() if self.copies_inputs else arg.view_as(arg)
        alias.register_hook(self._grad_hook(record.input_norms))  # type: ignore[no-untyped-call]
        self._taps.append((alias, alias._version))
        return alias

    def _after_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        try:
            record, self._current = self._current, None
            taps, self._taps = self._taps, []
            if record is None:
                return
            if not self.copies_inputs and any(t._version != v for t, v in taps):
                self.copies_inputs = True  # this pass's input hook was dropped; later passes copy
            outputs = _tensors(output)
            if not outputs:
                return
            for t in outputs:
                t.register_hook(self._grad_hook(record.output_norms))  # type: ignore[no-untyped-call]
            with self._lock:
                if len(self._passes) >= MAX_PENDING_PASSES:
                    del self._passes[: MAX_PENDING_PASSES // 2]
                self._passes.append(record)
        except Exception as exc:
            self._on_error(self._site, exc)

    def _grad_hook(self, sink: list[Tensor]) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            try:
                sink.append(_gain_norm(grad))
            except Exception as exc:
                self._on_error(self._site, exc)

        return hook


@dataclass(frozen=True)
class HostPasses:
    """Backward passes of one host, summed: per pass its seeds and parameter counts, and float64 sums.

    Pass i owns the next 1 + len(seeds[i]) values: the squared parameter-gradient
    norm of the host, then of each seed in order. `squares` holds one such vector
    per device the gradients were on (a host split over devices adds them up on
    the host after the publish's one copy per device); until then nothing leaves
    its device.
    """

    seeds: tuple[tuple[SeedKey, ...], ...]
    numels: tuple[tuple[int, ...], ...]  # per pass: trainable parameter elements, the host's then each seed's
    squares: tuple[Tensor, ...]  # per device, each of size sum(1 + len(seeds[i]))

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def size(self) -> int:
        return sum(1 + len(seeds) for seeds in self.seeds)

    def per_pass(
        self, squares: Sequence[float]
    ) -> Iterator[tuple[tuple[SeedKey, ...], tuple[int, ...], Sequence[float]]]:
        """Each pass's seeds, parameter counts and sums, cut from `squares` (the devices' sums, on the host)."""
        start = 0
        for seeds, numels in zip(self.seeds, self.numels, strict=True):
            stop = start + 1 + len(seeds)
            yield seeds, numels, squares[start:stop]
            start = stop


@dataclass(frozen=True)
class _Groups:
    """Which sum each hooked tensor's norm goes to and what the sums cover; a kept pass holds no parameter."""

    groups: tuple[int, ...]  # per tensor: 0 for the host, 1 + i for seeds[i]
    seeds: tuple[SeedKey, ...]
    numels: tuple[int, ...]  # trainable parameter elements: the host's, then each seed's


@dataclass(frozen=True)
class _Layout:
    """What one registration of the tensor hooks covers."""

    tensors: tuple[nn.Parameter, ...]
    sums: _Groups
    accumulators: dict[int, Any] = field(default_factory=dict)  # per tensor index: its AccumulateGrad node, once seen


@dataclass(frozen=True)
class _Measured:
    """One pass as its end-of-pass callback left it: a 0-d norm per gradient tensor, in the order of `order`."""

    sums: _Groups
    order: tuple[int, ...]  # per norm: the index of its tensor in the layout
    norms: tuple[Tensor, ...]


def _fold(measured: Sequence[_Measured]) -> HostPasses:
    """Square and sum the norms per pass and group in float64, a handful of ops per device for a whole batch.

    `index_add_` sums each group's own entries only, so a NaN or Inf stays in its group;
    norms on another device are summed there (no copy, no host sync).
    """
    bins: list[int] = []
    start = 0
    for m in measured:
        groups = m.sums.groups
        bins += [start + groups[i] for i in m.order]
        start += 1 + len(m.sums.seeds)
    norms = [n for m in measured for n in m.norms]
    try:
        parts = {norms[0].device: (torch.stack(norms), bins)}
    except RuntimeError:  # a host split over devices: stack refuses before any kernel runs
        by_device: dict[torch.device, tuple[list[Tensor], list[int]]] = {}
        for norm, b in zip(norms, bins, strict=True):
            on, at = by_device.setdefault(norm.device, ([], []))
            on.append(norm)
            at.append(b)
        parts = {device: (torch.stack(on), at) for device, (on, at) in by_device.items()}
    squares = tuple(
        torch.zeros(start, dtype=torch.float64, device=device).index_add_(
            0, index_tensor(at, device), values.to(torch.float64).square()
        )
        for device, (values, at) in parts.items()
    )
    return HostPasses(tuple(m.sums.seeds for m in measured), tuple(m.sums.numels for m in measured), squares)


@dataclass
class _Pass:
    """A backward pass in progress: which parameters' gradients are to be read from .grad and which were normed.

    Hooks only append (atomic under the GIL, so hooks on several device threads may race).
    """

    defers: bool  # gradients accumulate into .grad in this pass and may be read there at its end
    deferred: list[int] = field(default_factory=list)  # tensor indices whose fresh .grad is read at the end
    normed: list[tuple[int, Tensor]] = field(default_factory=list)  # tensor index and the norm its hook took
    failed: bool = False  # a hook's norm raised: the pass records nothing


def _grad_accumulator(param: Tensor) -> Any:
    """The autograd node that accumulates into param.grad (torch.autograd.graph._get_grad_fn_or_grad_acc)."""
    with torch.enable_grad():
        return param.view_as(param).grad_fn.next_functions[0][0]  # type: ignore[union-attr]


def _distributed() -> bool:
    """Under torch.distributed a wrapper may rewrite .grad in place during the pass (DDP buckets): never defer."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class HostProbe:
    """Per-backward-pass parameter-gradient norms of one host and the seeds watched in it (TELE-557).

    The host's parameters exclude every watched seed's. Seeds join and leave with
    `add` and `discard`; the hooks are re-registered over the new set each time.
    A parameter whose .grad is None when its gradient arrives in a `backward()`
    has exactly that gradient in .grad at the end of the pass, so its hook only
    marks it and one fused norm reads all of them then; any other (accumulating
    .grad, `torch.autograd.grad`, torch.distributed) is normed in its hook.
    """

    def __init__(self, host: nn.Module, on_error: ErrorSink, site: str = "seed_grad_hook") -> None:
        if not isinstance(host, nn.Module):
            raise TypeError(f"watch_seed needs the host as an nn.Module, got {type(host).__name__}")
        self.host = host
        self._on_error = on_error
        self._site = site
        self._lock = threading.Lock()
        self._seeds: dict[SeedKey, nn.Module] = {}
        self._layout: _Layout | None = None
        self._handles: list[RemovableHandle] = []
        self._pending: dict[int, _Pass] = {}  # per running graph task
        self._measured: list[_Measured] = []  # passes since the last fold
        self._folded: list[HostPasses] = []
        self.defers = True  # off for good once a deferred .grad was gone at the end of a pass

    @property
    def empty(self) -> bool:
        return not self._seeds

    def add(self, key: SeedKey, seed: nn.Module) -> None:
        """Start measuring `seed` in this host."""
        if not isinstance(seed, nn.Module):
            raise TypeError(f"watch_seed needs an nn.Module, got {type(seed).__name__}")
        if seed is self.host:
            raise ValueError(f"seed env={key[0]!r} slot={key[1]!r} is its own host; pass the module it grows in")
        self._seeds[key] = seed
        try:
            self._register()
        except Exception:
            del self._seeds[key]
            self._register()
            raise

    def discard(self, key: SeedKey) -> None:
        """Stop measuring a seed (its recorded passes are no longer read). Safe to call more than once."""
        if self._seeds.pop(key, None) is None:
            return
        self._register()

    def remove(self) -> None:
        """Detach the hook; safe to call more than once."""
        self._seeds.clear()
        self._register()

    def drain(self) -> list[HostPasses]:
        """The passes recorded since the last drain, summed (a fold failure is counted and loses its passes)."""
        with self._lock:
            folded, self._folded = self._folded, []
            measured, self._measured = self._measured, []
        if measured:
            try:
                with torch.no_grad():
                    folded.append(_fold(measured))
            except Exception as exc:
                self._on_error(self._site, exc)
        return folded

    def _register(self) -> None:
        """(Re-)register the tensor hooks over the host's own and every seed's trainable parameters."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        seed_ids = {id(p) for seed in self._seeds.values() for p in seed.parameters()}
        host_params = [p for p in dict.fromkeys(self.host.parameters()) if p.requires_grad and id(p) not in seed_ids]
        keys = tuple(self._seeds)
        tensors: list[nn.Parameter] = list(host_params)
        groups = [0] * len(host_params)
        numels = [sum(p.numel() for p in host_params)]
        seen = {id(p) for p in host_params}
        for i, key in enumerate(keys):
            own = [p for p in dict.fromkeys(self._seeds[key].parameters()) if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in own)
            tensors.extend(own)
            groups.extend([1 + i] * len(own))
            numels.append(sum(p.numel() for p in own))
        if not keys or not tensors:
            self._layout = None
            return
        layout = _Layout(tuple(tensors), _Groups(tuple(groups), keys, tuple(numels)))
        self._layout = layout
        self._handles = [
            p.register_hook(self._keep(layout, i))  # type: ignore[no-untyped-call]
            for i, p in enumerate(layout.tensors)
        ]

    def _keep(self, layout: _Layout, index: int) -> Callable[[Tensor], None]:
        """A parameter's hook: mark a gradient that lands in an empty .grad, else take its norm (one kernel)."""
        pending = self._pending
        param = layout.tensors[index]

        def hook(grad: Tensor) -> None:
            state = None
            try:
                task = torch._C._current_graph_task_id()
                state = pending.get(task) or self._open(layout, task, index)
                if state.defers and param.grad is None:
                    state.deferred.append(index)
                else:
                    state.normed.append((index, tensor_norm(grad)))
            except Exception as exc:  # telemetry must never break the backward pass
                if state is not None:
                    state.failed = True
                self._on_error(self._site, exc)

        return hook

    def _open(self, layout: _Layout, task: int, index: int) -> _Pass:
        """The state of a pass that just started; queues the engine callback once per pass (hooks may race)."""
        with self._lock:
            state = self._pending.get(task)
            if state is not None:
                return state
            state = self._pending[task] = _Pass(self._accumulates(layout, index))
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._finish(layout, task))
        return state

    def _accumulates(self, layout: _Layout, index: int) -> bool:
        """Whether this pass may defer: a `backward()` that accumulates into .grad, outside torch.distributed.

        The parameter's AccumulateGrad node is cached; one that is not in this
        pass's graph (torch made a new one, e.g. after `.to()`) is looked up again.
        """
        if not self.defers or _distributed():
            return False
        will_execute = torch._C._will_engine_execute_node
        try:
            node = layout.accumulators.get(index)
            if node is not None and will_execute(node):
                return True
            node = layout.accumulators[index] = _grad_accumulator(layout.tensors[index])
            return bool(will_execute(node))
        except RuntimeError:  # raised for leaves under torch.autograd.grad, which hands gradients back instead
            return False
        except Exception as exc:  # the hooks then norm every gradient themselves
            self._on_error(self._site, exc)
            return False

    def _finish(self, layout: _Layout, task: int) -> None:
        """End of a backward pass: one fused norm of the fresh .grad tensors, kept with the hooks' norms.

        Only that: every further op here costs ~10-30 us of cold code per pass on
        CPU, so the float64 sums per host and seed are made for FOLD_PASSES passes
        at a time (which bounds the tensors held) and at the drain. A pass with a
        failed norm, or whose deferred .grad is gone (a later hook consumed it),
        records nothing: missing, never a partial sum.
        """
        state = self._pending.pop(task, None)  # atomic under the GIL; _open's lock only orders the opening
        if state is None or state.failed or layout is not self._layout:
            return
        try:
            order = tuple(state.deferred)
            norms: list[Tensor] = []
            if order:
                tensors = layout.tensors
                grads = [tensors[i].grad for i in order]
                if any(g is None for g in grads):
                    self.defers = False
                    return
                with torch.no_grad():
                    norms = tensor_norm_list(grads)  # type: ignore[arg-type]
            if state.normed:
                order += tuple(i for i, _ in state.normed)
                norms.extend(n for _, n in state.normed)
            if not norms:
                return
            batch: list[_Measured] = []
            with self._lock:
                self._measured.append(_Measured(layout.sums, order, tuple(norms)))
                if len(self._measured) >= FOLD_PASSES:
                    batch, self._measured = self._measured, []
            if batch:
                with torch.no_grad():
                    block = _fold(batch)
                with self._lock:
                    self._folded.append(block)
                    if len(self._folded) > MAX_PENDING_PASSES // FOLD_PASSES:
                        del self._folded[: len(self._folded) // 2]
        except Exception as exc:  # telemetry must never break the backward pass
            self._on_error(self._site, exc)
