"""The demo trainer: a real factored-action PPO agent growing seeds in host networks.

`tele-exporter demo` runs it with live telemetry; tests drive it in-process with
`Trainer` or `run_demo`.
"""

from .faults import FAULTS, FaultPlan
from .ppo import DemoConfig, Trainer, UpdateResult, run_demo

__all__ = ["FAULTS", "DemoConfig", "FaultPlan", "Trainer", "UpdateResult", "run_demo"]
