"""Atomic file writes: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pixelpick.errors import DiskFullError

if TYPE_CHECKING:  # pandas costs the annotator's server 100 MB: imported where a table is written
    import pandas as pd

_FULL = (errno.ENOSPC, errno.EDQUOT)

# A temporary file untouched for this long belongs to a writer that crashed: live writers keep writing to theirs,
# and between their last write and the rename there is only an fsync.
STALE_TEMPORARY_SECONDS = 300.0
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the process's umask means setting it: put it straight back


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write` on a temporary file beside `path`, fsync it, then rename it over `path`.

    Temporary files of `path` that a crashed writer left behind (`.<name>.XXXXXXXX.tmp`) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; others (a team's share) should read them
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in _FULL:
            raise DiskFullError(disk_full_message(path)) from error
        raise
    return path


def disk_full_message(path: str | Path) -> str:
    """One line for a write to `path` that found its filesystem full: where, how much is free, what to free."""
    path = Path(path)
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return (f"the disk is full: writing {path} failed ({free} on the filesystem holding {folder}); free space "
            "there (older rounds' probability stores rounds/rNN/probs.zarr, data/cache, the DVC cache .dvc/cache) "
            "and run the same command again: what was written before is intact")


def remove_stale_temporaries(path: str | Path, *, older_than: float = STALE_TEMPORARY_SECONDS) -> list[Path]:
    """Delete the temporary files of `path` (as `atomic_write` names them) not modified for `older_than` seconds.

    Returns the files removed. Younger ones may belong to a writer that is still at work, so they are kept.
    """
    path = Path(path)
    # mkstemp's random part is 8 characters from [a-z0-9_]; matching it exactly leaves other files' names alone.
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    cutoff = time.time() - older_than
    removed = []
    try:
        candidates = [entry for entry in os.scandir(path.parent) if pattern.fullmatch(entry.name)]
    except FileNotFoundError:
        return removed
    for entry in candidates:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:  # another writer cleaned it up first
            continue
    return removed


def write_parquet(frame: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write(path, lambda f: frame.to_parquet(f, index=False))


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write(path, lambda f: f.write(frame.to_csv(index=False).encode()))


def write_json(value: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(value, indent=2, sort_keys=True).encode()))
