"""Stopping test subprocesses by PID: SIGTERM, then SIGKILL when it does not go."""

from __future__ import annotations

import subprocess


def stop_process(process: subprocess.Popen[str] | subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Terminate, wait up to `grace_s`, then kill; a process already gone is left alone."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
