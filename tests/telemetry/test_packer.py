"""Packer: named pieces in, one copy per device, the same pieces back by key."""

from __future__ import annotations

import pytest
import torch

import tele_exporter.telemetry.packer as packer_module
from tele_exporter.telemetry.packer import Packer


def test_pieces_come_back_by_key_in_the_order_they_were_added() -> None:
    packer = Packer()
    packer.add("rows", torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    packer.add("kl", torch.tensor(0.5))
    packer.add(("host", 0), torch.tensor([7.0, 8.0, 9.0], dtype=torch.float32))
    packer.add("kl", torch.tensor(0.25, dtype=torch.float64))
    host = packer.transfer()
    assert host.cat("rows").tolist() == [1.0, 2.0, 3.0, 4.0]
    assert [t.tolist() for t in host.pieces("kl")] == [[0.5], [0.25]]
    assert host.cat("kl").tolist() == [0.5, 0.25]
    assert host.cat(("host", 0)).dtype == torch.float64 and host.cat(("host", 0)).tolist() == [7.0, 8.0, 9.0]
    assert host.pieces("never") == [] and host.cat("never").numel() == 0


def test_an_empty_packer_transfers_nothing() -> None:
    host = Packer().transfer()
    assert host.flat.numel() == 0 and host.cat("rows").numel() == 0


def test_one_copy_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces on two devices ('meta' stands in for a GPU): one concatenation and one copy for each device."""
    copies: list[str] = []
    real = torch.Tensor.cpu

    def counting_cpu(self: torch.Tensor) -> torch.Tensor:
        copies.append(self.device.type)
        return real(self) if self.device.type == "cpu" else torch.full(self.shape, 2.0, dtype=self.dtype)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    packer = Packer()
    packer.add("a", torch.tensor([1.0]))
    packer.add("b", torch.empty(2, device="meta"))
    packer.add("a", torch.tensor([3.0]))
    packer.add("b", torch.empty(1, device="meta"))
    host = packer.transfer()
    assert sorted(copies) == ["cpu", "meta"]
    assert host.cat("a").tolist() == [1.0, 3.0] and host.cat("b").tolist() == [2.0, 2.0, 2.0]
    assert packer_module.gather([]).numel() == 0
