"""One process at a time per campaign: an exclusive lock on the campaign's `.lock` file.

The lock is an OS file lock (`flock`), so the kernel releases it when its holder dies however it dies: a lock left
by a killed process is simply free, and the next run takes it over. The file also says who holds the lock (pid,
host, start time, command), so a second run is refused at once with a message naming the holder. The lock is
re-entrant within a process: a flow that holds it can run steps that ask for it again.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pixelpick.errors import CampaignLockedError

_held: dict[Path, tuple[int, int]] = {}  # lock path -> (file descriptor, depth), for this process
_guard = threading.Lock()


@contextmanager
def campaign_lock(path: Path, campaign: str) -> Iterator[None]:
    """Hold the lock at `path` for the duration of the block; CampaignLockedError if another process holds it."""
    path = Path(path).resolve()
    with _guard:
        if path in _held:
            descriptor, depth = _held[path]
            _held[path] = (descriptor, depth + 1)
        else:
            _held[path] = (_acquire(path, campaign), 1)
    try:
        yield
    finally:
        with _guard:
            descriptor, depth = _held[path]
            if depth > 1:
                _held[path] = (descriptor, depth - 1)
            else:
                del _held[path]
                os.close(descriptor)  # closing releases the flock


def holds(path: Path) -> bool:
    """Whether this process holds the lock at `path` already."""
    with _guard:
        return Path(path).resolve() in _held


def _acquire(path: Path, campaign: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe_holder(descriptor)
        os.close(descriptor)
        raise CampaignLockedError(f"campaign {campaign!r} is already being run by {holder}; wait for it to finish "
                                  f"or stop it (a killed process releases the lock)") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv)[:300]}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(holder).encode(), 0)
    return descriptor


def _describe_holder(descriptor: int) -> str:
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on {holder['host']} since {holder['started']} ({holder['command']})"
    except (ValueError, KeyError, OSError):
        return "another process"
