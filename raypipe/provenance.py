"""Which code made a run: raypipe's version and, in a git checkout, its commit (recorded in
summary.json and in every checkpoint's state.json, as torchtitan and the speedrun logs do)."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

from . import __version__


@lru_cache(maxsize=1)
def code_version() -> dict:
    """{"raypipe": version, "git_commit": sha or None, "git_dirty": bool or None}. None where the code
    is not a git checkout (an installed wheel, a `ray job submit` upload, which leaves .git out)."""
    root = Path(__file__).resolve().parent.parent
    commit = dirty = None
    try:
        git = ["git", "-C", str(root)]
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=5)
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == root:  # raypipe's own repository
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=5).stdout.strip() or None
            status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        pass
    return {"raypipe": __version__, "git_commit": commit, "git_dirty": dirty}
