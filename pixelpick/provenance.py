"""Which code made a file: the package's source digest (part of every derived step's key), its version and the git
commit it came from (kept in every step record, and tagged on every registered model).

Code is an input like any other: a derived step made by other code is stale. History (the pixels people were asked
about) is not derived, and never is recomputed for a code change (`pixelpick.recipe.is_history`).
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from pixelpick.digests import tree_md5

PACKAGE = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def code_digest() -> str:
    """The md5 of the package's files (byte-code and hidden files excluded, as DVC's .dvcignore does)."""
    return tree_md5(PACKAGE)


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """{"version", "digest", "commit", "dirty"}: commit and dirty are None outside a git work tree."""
    try:
        version = metadata.version("pixelpick")
    except metadata.PackageNotFoundError:
        version = None
    commit = _git("rev-parse", "HEAD")
    dirty = None if commit is None else bool(_git("status", "--porcelain", "--untracked-files=no", "--", "."))
    return {"version": version, "digest": code_digest(), "commit": commit, "dirty": dirty}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=PACKAGE, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
