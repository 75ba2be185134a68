"""One packer for the update's single host transfer: append named float64 pieces, get their host slices back.

Every producer of an update (the gradient meter's rows, KL and clip fractions, seed
probes, policy health) adds its device tensors under a key; `transfer()` copies them
all to the host with one copy per device, and the fold reads each piece back by key.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor


class Packer:
    """Pieces of an update, in order, each under a key (a key may hold several pieces).

    Pieces added with `values=True` (small ones: KL, policy health, seed sums) must come
    after the others; the host reads all of them back as Python floats with one `tolist()`.
    """

    def __init__(self) -> None:
        self._parts: list[Tensor] = []
        self._spans: dict[Hashable, list[tuple[int, int]]] = {}
        self._size = 0
        self._values_from: int | None = None

    def add(self, key: Hashable, tensor: Tensor, *, values: bool = True) -> None:
        """Append `tensor` (any shape, flattened, converted to float64 in the transfer) under `key`.

        values=False: a large piece read on the host as a tensor only (the gradient rows).
        """
        flat = tensor.reshape(-1)
        if values and self._values_from is None:
            self._values_from = self._size
        elif not values and self._values_from is not None:
            raise ValueError(f"piece {key!r}: pieces read as tensors only must come before the others")
        self._spans.setdefault(key, []).append((self._size, self._size + flat.numel()))
        self._parts.append(flat)
        self._size += flat.numel()

    def transfer(self) -> Unpacked:
        """Copy every piece to the host, one copy per device, and hand back their slices."""
        return Unpacked(
            gather(self._parts), self._spans, self._size if self._values_from is None else self._values_from
        )


class Unpacked:
    """The host copy of a Packer's pieces, read back by key: as tensors, or as Python floats."""

    def __init__(self, flat: Tensor, spans: dict[Hashable, list[tuple[int, int]]], values_from: int = 0) -> None:
        self.flat = flat
        self._spans = spans
        self._values_from = values_from
        self._values: list[float] | None = None

    def values(self, key: Hashable) -> list[list[float]]:
        """Each piece under `key` as Python floats; the first call reads every such piece with one tolist()."""
        if self._values is None:
            self._values = self.flat[self._values_from :].tolist()
        start, spans = self._values_from, self._spans.get(key, [])
        if any(a < start for a, _ in spans):
            raise ValueError(f"piece {key!r} was added with values=False; read it with cat() or pieces()")
        return [self._values[a - start : b - start] for a, b in spans]

    def pieces(self, key: Hashable) -> list[Tensor]:
        """Each piece added under `key`, in order (an empty list for a key never added)."""
        return [self.flat[a:b] for a, b in self._spans.get(key, [])]

    def cat(self, key: Hashable) -> Tensor:
        """Every piece under `key` as one float64 vector (empty for a key never added)."""
        spans = self._spans.get(key, [])
        if len(spans) == 1:
            a, b = spans[0]
            return self.flat[a:b]
        if not spans:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([self.flat[a:b] for a, b in spans])


def gather(parts: list[Tensor]) -> Tensor:
    """Concatenate float64 pieces in order on the host with one copy per device."""
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    devices = list(dict.fromkeys(p.device for p in parts))
    if len(devices) == 1:
        return torch.cat([p.to(torch.float64) for p in parts]).cpu()
    host = {d: torch.cat([p.to(torch.float64) for p in parts if p.device == d]).cpu() for d in devices}
    cursor = dict.fromkeys(devices, 0)
    out = []
    for p in parts:
        n = p.numel()
        out.append(host[p.device][cursor[p.device] : cursor[p.device] + n])
        cursor[p.device] += n
    return torch.cat(out)
