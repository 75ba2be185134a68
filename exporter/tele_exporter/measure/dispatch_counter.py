"""Counting what a piece of code dispatches: kernel launches and per-value host reads, not time.

On a GPU every aten op that is neither a view nor a bare allocation is a kernel launch,
and a small RL policy's step is bound by launches; `_local_scalar_dense` (`.item()`,
`float()`, `bool()` of a tensor), `.tolist()` and `.numpy()` read values on the host.
Counts are the same on any machine, so tests and the bench can hold them as a contract.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
"""Ops that only allocate (no kernel runs)."""
SCALAR_READ = "_local_scalar_dense"


class DispatchCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves the mode untyped
    """Counts launching ops by name, and host reads, while active (`with DispatchCounter() as c:`)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: Counter[str] = Counter()
        self.reads = 0
        self._patched: list[tuple[str, Callable[..., Any]]] = []

    @property
    def launches(self) -> int:
        """Kernel-launching ops (host reads excluded)."""
        return sum(n for name, n in self.ops.items() if name != SCALAR_READ)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = func._overloadpacket.__name__
        if name == SCALAR_READ:
            self.reads += 1
        if not func.is_view and name not in ALLOCATIONS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> DispatchCounter:
        for method in ("tolist", "numpy"):  # reads that do not go through the dispatcher
            original = getattr(torch.Tensor, method)
            self._patched.append((method, original))
            setattr(torch.Tensor, method, self._counting(original))
        super().__enter__()  # type: ignore[no-untyped-call]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        super().__exit__(exc_type, exc, tb)  # type: ignore[no-untyped-call]
        for method, original in self._patched:
            setattr(torch.Tensor, method, original)
        self._patched = []

    def _counting(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.reads += 1
            return original(tensor, *args, **kwargs)

        return read
