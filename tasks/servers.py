"""Prefect's temporary server, when a run dies without stopping it.

Without PREFECT_API_URL, Prefect starts a temporary server in a child process and stops it when the flow's process
exits. A process killed outright (SIGKILL, an out-of-memory kill) cannot stop it, and the server keeps running, an
orphan. The next run stops such orphans: servers started for this project's PREFECT_HOME whose parent is gone.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def orphaned_servers(prefect_home: str) -> list[int]:
    """Pids of temporary Prefect servers for `prefect_home` that outlived the process that started them."""
    wanted = {b"PREFECT__SERVER_EPHEMERAL=1", f"PREFECT_HOME={prefect_home}".encode()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = set((entry / "environ").read_bytes().split(b"\0"))
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if wanted <= environment and parent == 1:  # re-parented to init: its starter died
            found.append(int(entry.name))
    return found


def stop_orphaned_servers() -> list[int]:
    """Stop the temporary servers earlier runs of this project left behind; returns their pids."""
    home = os.environ.get("PREFECT_HOME")
    if not home or os.environ.get("PREFECT_API_URL") or not Path("/proc").is_dir():
        return []
    stopped = []
    for pid in orphaned_servers(home):
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except ProcessLookupError:
            continue
    if stopped:
        log.warning("stopped %d temporary Prefect server(s) left by a killed run: pid %s", len(stopped),
                    ", ".join(map(str, stopped)))
    return stopped
