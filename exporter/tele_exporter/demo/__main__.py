"""`python -m tele_exporter.demo`: the demo subcommand on its own, with the same flags."""

from __future__ import annotations

import argparse
import sys

from .cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    """Parse the demo's flags and run it."""
    parser = argparse.ArgumentParser(prog="tele-exporter demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
