"""`tele-exporter demo`: train the demo agent and serve its telemetry on /metrics.

Prints the live page's and /metrics' URLs first, then one line per PPO update and a
summary at the end; Ctrl-C (or SIGTERM) stops after the current update, closes the
server and exits 0. A fault run trains until Ctrl-C unless --updates says otherwise.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

import torch

from ..catalog.display import show
from ..catalog.model import MetricSpec, default_catalog
from ..server.addresses import listen_address
from ..server.http import DEFAULT_ADDR, DEFAULT_PORT, PortInUseError, serve
from ..server.web_config import WebConfig, WebConfigError, load_web_config
from .faults import FAULTS, FaultPlan
from .ppo import DemoConfig, Trainer, UpdateResult


def web_config_file(text: str) -> WebConfig:
    """Load and validate a --web.config.file for argparse; a bad file exits 2 naming the field."""
    try:
        return load_web_config(text)
    except WebConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def non_negative_int(text: str) -> int:
    """An integer >= 0 for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 for argparse."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags."""
    defaults = DemoConfig()
    parser.add_argument(
        "--updates",
        type=non_negative_int,
        default=None,
        help=f"PPO updates to run; 0 runs until Ctrl-C (default: {defaults.updates}, or 0 with --fault)",
    )
    parser.add_argument(
        "--envs",
        type=positive_int,
        default=defaults.envs,
        help="environments stepped in parallel (default: %(default)s)",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen",
        type=listen_address,
        default=(DEFAULT_ADDR, DEFAULT_PORT),
        metavar="HOST:PORT",
        help=f"where to serve /metrics; port 0 picks a free one (default: {DEFAULT_ADDR}:{DEFAULT_PORT})",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config",
        type=web_config_file,
        default=None,
        metavar="FILE",
        help="exporter-toolkit web config for TLS and basic auth (see docs/security.md)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=defaults.device,
        help="where the policy trains (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--target-kl",
        type=positive_float,
        default=defaults.target_kl,
        help="PPO target KL; epochs stop early past the catalog's factor times it (default: %(default)s)",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=positive_float,
        default=defaults.max_grad_norm,
        help="gradient clipping threshold (default: %(default)s)",
    )
    parser.add_argument(
        "--fault",
        choices=FAULTS,
        default="none",
        help="inject a training fault to see its alert fire (default: %(default)s)",
    )
    parser.add_argument(
        "--fault-after",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="the fault starts with update N+1 (default: %(default)s)",
    )
    parser.add_argument(
        "--fault-until",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="the fault stops after update N (default: never)",
    )


def progress_line(result: UpdateResult, total: int) -> str:
    """One update as a console line, with the catalog's level words for KL, grad norm and CV."""
    catalog = default_catalog()
    of = str(total) if total else "inf"
    grad = result.grad_norm_pre
    p = result.policy
    fault = "  [fault]" if result.fault_active else ""
    return (
        f"update {result.update}/{of}  reward {result.reward:+.4f}"
        f"  kl {_fmt(result.kl, 4)} ({_word(catalog['kl_divergence'], result.kl)})"
        f"  grad {_fmt(grad, 3)} ({_word(catalog['policy_grad_norm'], grad)})"
        f"  cv {_fmt(result.gradient_cv, 3)} ({_word(catalog['gradient_cv'], result.gradient_cv)})"
        f"  ent {_fmt(p.entropy, 3)} ({_word(catalog['policy_entropy'], p.entropy)})"
        f"  ev {_fmt(p.explained_variance, 3)} ({_word(catalog['explained_variance'], p.explained_variance)})"
        f"  seeds {result.live_seeds}{fault}"
    )


def updates_wanted(args: argparse.Namespace) -> int:
    """--updates as given; unset, a fault run goes on until Ctrl-C so its alert can fire."""
    if args.updates is not None:
        return int(args.updates)
    return 0 if args.fault != "none" else DemoConfig().updates


def check_fault_window(args: argparse.Namespace) -> str | None:
    """Why the fault flags can never inject a fault, or None when they can."""
    if args.fault_until is None:
        return None
    if args.fault_until <= args.fault_after:
        return (
            f"--fault-until {args.fault_until} must be greater than --fault-after {args.fault_after}: "
            f"the fault is on for updates after {args.fault_after} up to {args.fault_until}"
        )
    if args.fault == "none":
        return "--fault-until is given without --fault"
    return None


def summary_line(results: Sequence[UpdateResult], seconds: float) -> str:
    """The end-of-run summary: updates, time, reward, and how many updates each signal left healthy."""
    if not results:
        return f"tele-exporter demo: no update finished in {seconds:.1f} s"
    catalog = default_catalog()
    signals = {
        "kl": ("kl_divergence", [r.kl for r in results]),
        "grad": ("policy_grad_norm", [r.grad_norm_pre for r in results]),
        "cv": ("gradient_cv", [r.gradient_cv for r in results]),
    }
    counts = []
    for word, (metric, values) in signals.items():
        healthy = sum(_word(catalog[metric], v) == "healthy" for v in values)
        counts.append(f"{word} {healthy}/{len(values)}")
    faulty = sum(r.fault_active for r in results)
    tail = results[-min(10, len(results)) :]
    reward = sum(r.reward for r in tail) / len(tail)
    return (
        f"tele-exporter demo: {results[-1].update} updates in {seconds:.1f} s;"
        f" mean reward of the last {len(tail)} {reward:+.4f};"
        f" healthy updates: {', '.join(counts)}" + (f"; fault on in {faulty}" if faulty else "")
    )


def run(args: argparse.Namespace) -> int:
    """Train with live telemetry until the updates are done or Ctrl-C; exit status."""
    problem = check_fault_window(args)
    if problem is not None:
        print(f"tele-exporter demo: {problem}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "tele-exporter demo: --device cuda given but no CUDA device is available",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(1)
    config = DemoConfig(
        updates=updates_wanted(args),
        envs=args.envs,
        seed=args.seed,
        device=args.device,
        target_kl=args.target_kl,
        max_grad_norm=args.max_grad_norm,
        fault=FaultPlan(args.fault, args.fault_after, args.fault_until),
    )
    host, port = args.listen
    trainer = Trainer(config)
    try:
        server = serve(trainer.tele, port=port, addr=host, web_config=args.web_config)
    except OSError as exc:
        trainer.close()
        reason = exc.strerror or str(exc)
        if not isinstance(exc, PortInUseError) and f"{host}:{port}" not in reason:
            reason = f"cannot listen on {host}:{port}: {reason}"
        print(f"tele-exporter demo: {reason}", file=sys.stderr)
        return 1
    print(f"tele-exporter demo: live page at {server.base_url}/ and metrics at {server.url}", flush=True)
    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    start = time.monotonic()
    try:
        results = trainer.run(on_update=lambda r: print(progress_line(r, config.updates), flush=True), stop=stop)
        trainer.tele.finish()  # a clean end (all updates, or Ctrl-C between updates): no absence alert
    finally:
        restore()
        server.close()
        trainer.close()
    if stop.is_set():
        print("tele-exporter demo: stopped", flush=True)
    print(summary_line(results, time.monotonic() - start), flush=True)
    return 0


def _install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM set `stop` (main thread only); returns what restores the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    signals = [signal.SIGINT, signal.SIGTERM]

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, handler) for s in signals}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


def _word(spec: MetricSpec, value: float | None) -> str:
    level = spec.level_of(value) if value is not None else None
    return level.name if level is not None else show(spec, value).status


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "missing"
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
