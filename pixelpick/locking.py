"""One process at a time per campaign: an exclusive lock on the campaign's `.lock` file.

The lock is filelock's OS file lock (`flock`), so the kernel releases it when its holder dies however it dies: a
lock left by a killed process is simply free, and the next run takes it over. The file also says who holds the lock
(pid, host, start time, command), so a second run is refused at once with a message naming the holder. The lock is
re-entrant within a process, across threads: a flow that holds it can run steps (in Prefect's worker threads) that
ask for it again.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from pixelpick.errors import CampaignLockedError

_locks: dict[Path, FileLock] = {}  # one per lock path in this process, so its hold count is shared
_guard = threading.Lock()


@contextmanager
def campaign_lock(path: Path, campaign: str) -> Iterator[None]:
    """Hold the lock at `path` for the duration of the block; CampaignLockedError if another process holds it."""
    path = Path(path).resolve()
    with _guard:
        # thread_local=False: a hold taken by the flow's thread counts in the task threads too.
        lock = _locks.setdefault(path, FileLock(path, timeout=0, thread_local=False))
        first = not lock.is_locked
        try:
            lock.acquire()
        except Timeout:
            raise CampaignLockedError(f"campaign {campaign!r} is already being run by {_describe_holder(path)}; wait "
                                      f"for it to finish or stop it (a killed process releases the lock)") from None
        if first:
            _write_holder(path)
    try:
        yield
    finally:
        with _guard:
            lock.release()


def holds(path: Path) -> bool:
    """Whether this process holds the lock at `path` already."""
    with _guard:
        lock = _locks.get(Path(path).resolve())
        return lock is not None and lock.is_locked


def held_elsewhere(path: Path) -> str | None:
    """Who holds the lock at `path` if another process does (pid, host, start, command); None when it is free or
    this process holds it. Nothing is created where no lock file is; a free lock is taken and let go at once."""
    path = Path(path).resolve()
    if not path.is_file() or holds(path):
        return None
    try:
        with campaign_lock(path, path.parent.name):
            return None
    except CampaignLockedError:
        return _describe_holder(path)


def _write_holder(path: Path) -> None:
    holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": datetime.now(UTC).isoformat(timespec="seconds"),
                         "command": " ".join(sys.argv)[:300]}).encode()
    # Written in place, then cut to length: a contender reading it never finds it empty, and the locked inode stays.
    descriptor = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(descriptor, holder, 0)
        os.ftruncate(descriptor, len(holder))
    finally:
        os.close(descriptor)


def _describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_bytes() or b"{}")
        return f"pid {holder['pid']} on {holder['host']} since {holder['started']} ({holder['command']})"
    except (ValueError, KeyError, OSError):
        return "another process"
