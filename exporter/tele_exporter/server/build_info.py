"""tele_build_info's labels: this package's version, its git revision and torch's version.

The revision is read from the checkout's .git files (no git process); an installed
package outside a checkout reports "unknown". Torch's version comes from its installed
metadata, so the server layer never imports torch.
"""

from __future__ import annotations

import importlib.metadata
from functools import cache
from pathlib import Path

from .._version import __version__

UNKNOWN = "unknown"


@cache
def build_info() -> tuple[str, str, str]:
    """(version, revision, torch version), read once."""
    return __version__, git_revision(Path(__file__).resolve().parent), torch_version()


def torch_version() -> str:
    """The installed torch distribution's version (what torch.__version__ says), or "unknown"."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN


def git_revision(start: Path) -> str:
    """The commit checked out in the git work tree holding `start`, or "unknown"."""
    for folder in (start, *start.parents):
        dot_git = folder / ".git"
        if dot_git.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = dot_git.read_text(encoding="utf-8").strip()
            if not text.startswith("gitdir:"):
                return UNKNOWN
            return _head(folder / text.removeprefix("gitdir:").strip())
        if dot_git.is_dir():
            return _head(dot_git)
    return UNKNOWN


def _head(git_dir: Path) -> str:
    try:
        head = (git_dir / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref:"):
            return head
        ref = head.removeprefix("ref:").strip()
        common = git_dir
        if (git_dir / "commondir").is_file():
            common = git_dir / (git_dir / "commondir").read_text(encoding="utf-8").strip()
        for base in (git_dir, common):
            if (base / ref).is_file():
                return (base / ref).read_text(encoding="utf-8").strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text(encoding="utf-8").splitlines():
                sha, _, name = line.partition(" ")
                if name == ref:
                    return sha
    except OSError:
        return UNKNOWN
    return UNKNOWN
