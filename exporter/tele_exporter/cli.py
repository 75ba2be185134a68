"""The `tele-exporter` command: demo, generate, bench, stack."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from .catalog.model import CatalogError, load_catalog

# Subcommands that live in their own modules: name -> (module, help).
# Each module exposes add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "demo": ("tele_exporter.demo.cli", "train a real factored-action PPO agent with live telemetry"),
    "bench": ("tele_exporter.bench", "measure telemetry overhead against a plain clip_grad_norm_ step"),
    "stack": ("tele_exporter.stack", "start a local Prometheus and Alertmanager with the shipped configs"),
}


def _repo_root() -> Path | None:
    """The checkout holding prometheus/ and grafana/: the current directory or above; None outside one."""
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "pyproject.toml").exists() and (candidate / "prometheus").is_dir():
            return candidate
    return None


def _generate(args: argparse.Namespace) -> int:
    from . import generate

    try:
        catalog = load_catalog(args.catalog)
    except CatalogError as exc:
        print(f"tele-exporter generate: {exc}", file=sys.stderr)
        return 2
    root = Path(args.root) if args.root else _repo_root()
    if root is None:
        print(
            f"tele-exporter generate: {Path.cwd()} is not in a tele-exporter checkout (no pyproject.toml "
            "and prometheus/ here or above); run it in the checkout or pass --root DIR",
            file=sys.stderr,
        )
        return 2
    if args.check:
        stale = generate.stale(root, catalog)
        for rel in stale:
            why = "stale" if (root / rel).exists() else "missing"
            print(f"{why}: {rel} (run `tele-exporter generate`)", file=sys.stderr)
        return 1 if stale else 0
    for rel in generate.write(root, catalog):
        print(f"wrote {rel}")
    return 0


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported, so one cannot break another."""
    parser = argparse.ArgumentParser(prog="tele-exporter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="write rules, runbook, dashboards and Grafana alerting from the catalog")
    gen.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale")
    gen.add_argument("--catalog", default=None, help="catalog file (default: the packaged one)")
    gen.add_argument("--root", default=None, help="repository root (default: found from the cwd)")
    gen.set_defaults(func=_generate)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(cmd)
            cmd.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in args_list if not a.startswith("-")), None)
    args = build_parser(chosen).parse_args(args_list)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
