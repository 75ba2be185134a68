"""launch: world size and torchrun restart number from the environment, exported by every rank."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tele_exporter import Telemetry
from tele_exporter.telemetry.launch import Launch, launch_info

from ..conftest import TinyPolicy


def _samples(registry: CollectorRegistry, name: str) -> list[float]:
    text = generate_latest(registry).decode()
    return [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def test_single_process_is_world_size_one_without_restarts() -> None:
    assert launch_info({}) == Launch(world_size=1, restarts=None)


def test_torchrun_environment_gives_world_size_and_restarts() -> None:
    assert launch_info({"WORLD_SIZE": "4", "TORCHELASTIC_RESTART_COUNT": "2"}) == Launch(4, 2)
    assert launch_info({"WORLD_SIZE": " ", "TORCHELASTIC_RESTART_COUNT": "0"}) == Launch(1, 0)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"WORLD_SIZE": "two"}, r"WORLD_SIZE must be an integer >= 1, got 'two'"),
        ({"WORLD_SIZE": "0"}, r"WORLD_SIZE must be an integer >= 1, got 0"),
        ({"TORCHELASTIC_RESTART_COUNT": "-1"}, r"TORCHELASTIC_RESTART_COUNT must be an integer >= 0"),
    ],
)
def test_malformed_variables_are_named(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        launch_info(environ)


def test_every_rank_exports_world_size_and_restarts_from_the_start(
    policy: TinyPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    registry = CollectorRegistry()
    Telemetry(policy, heads={"op": policy.op}, registry=registry)
    assert _samples(registry, "tele_world_size") == [3.0]
    assert _samples(registry, "tele_torchrun_restarts") == [2.0]


def test_restarts_are_absent_outside_torchrun(policy: TinyPolicy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    registry = CollectorRegistry()
    Telemetry(policy, heads={"op": policy.op}, registry=registry)
    assert _samples(registry, "tele_world_size") == [1.0]
    assert _samples(registry, "tele_torchrun_restarts") == []


def test_an_initialised_process_group_wins_over_the_environment() -> None:
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert launch_info({"WORLD_SIZE": "4"}).world_size == 1
    finally:
        torch.distributed.destroy_process_group()
