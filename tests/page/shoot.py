"""Screenshots of the live page from real demo runs, for the README and docs/page.md.

    python -m tests.page.shoot [OUTDIR]     # default docs/img

Writes page-healthy.png (a healthy run) and page-faulted.png (the same run with
the `explode` fault from update 7 on), each after 10 updates, taken in headless
Chromium exactly as the browser tests take theirs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cdp import Chromium
from .live import capture, demo_run

UPDATES = 10
RUNS = {"healthy": ("none", 0), "faulted": ("explode", 6)}


def main(argv: list[str]) -> int:
    """Take both screenshots into the given folder; exit status."""
    out = Path(argv[0] if argv else "docs/img")
    out.mkdir(parents=True, exist_ok=True)
    with Chromium() as browser:
        for name, (fault, after) in RUNS.items():
            with demo_run(fault, updates=UPDATES, fault_after=after) as (_, server):
                shot = capture(browser, server)
            if shot.errors:
                print(f"{name}: the page logged errors: {shot.errors}", file=sys.stderr)
                return 1
            path = out / f"page-{name}.png"
            path.write_bytes(shot.png)
            print(f"{path}: {len(shot.png) // 1024} KiB, panels {shot.state['panels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
