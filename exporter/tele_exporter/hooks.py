"""The only module that registers PyTorch hooks: TELE-557's seed gradient probes.

A seed's backward gain is measured with tensor hooks, not full backward hooks.
The forward pre-hook hands the seed a `view_as` alias of each input and hooks the
alias: a hook on the input itself would also see gradient arriving through the
host's skip path, which is not the seed's. A seed that modifies its input in
place would drop a hook on a view, so once a probe sees that (the alias's
version counter moved) it hands that seed a copy instead. The forward hook hooks
the output. Each hook only appends a device-side squared norm; no host sync.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

ErrorSink = Callable[[str, BaseException], None]
MAX_PENDING_PASSES = 4096


@dataclass
class BackwardPass:
    """Squared gradient norms reaching one forward call's inputs and output."""

    input_sq: list[Tensor] = field(default_factory=list)
    output_sq: list[Tensor] = field(default_factory=list)


def _tensors(value: Any) -> list[Tensor]:
    """Floating tensors that take part in autograd, found in a module's args or output."""
    if isinstance(value, Tensor):
        return [value] if value.requires_grad and value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _sq_norm(grad: Tensor) -> Tensor:
    norm: Tensor = torch.linalg.vector_norm(grad.detach(), dtype=torch.float64)
    return norm.square()


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
        alias.register_hook(self._grad_hook(record.input_sq))  # type: ignore[no-untyped-call]
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
                t.register_hook(self._grad_hook(record.output_sq))  # type: ignore[no-untyped-call]
            with self._lock:
                if len(self._passes) >= MAX_PENDING_PASSES:
                    del self._passes[: MAX_PENDING_PASSES // 2]
                self._passes.append(record)
        except Exception as exc:
            self._on_error(self._site, exc)

    def _grad_hook(self, sink: list[Tensor]) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            try:
                sink.append(_sq_norm(grad))
            except Exception as exc:
                self._on_error(self._site, exc)

        return hook
