"""What a rank was launched with: the job's world size and torchrun's restart number.

Read once when a Telemetry is built and exported as `tele_world_size` and
`tele_torchrun_restarts`, so Prometheus can tell how many ranks should report.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

RESTART_VARIABLE = "TORCHELASTIC_RESTART_COUNT"


@dataclass(frozen=True)
class Launch:
    """The world size (1 for a single process) and the restart number (None: not under torchrun)."""

    world_size: int
    restarts: int | None


def env_int(name: str, environ: Mapping[str, str], minimum: int) -> int | None:
    """An integer environment variable, None when unset or empty; ValueError naming it when malformed."""
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def launch_info(environ: Mapping[str, str] | None = None) -> Launch:
    """The world size of an initialised torch.distributed, else WORLD_SIZE, else 1; and the restart number."""
    env = os.environ if environ is None else environ
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        world = int(dist.get_world_size())
    else:
        world = env_int("WORLD_SIZE", env, 1) or 1
    return Launch(world, env_int(RESTART_VARIABLE, env, 0))
