"""Prefect's temporary server, when a run dies without stopping it.

Without PREFECT_API_URL, Prefect starts a temporary server in a child process and stops it when the flow's process
exits. A process killed outright (SIGKILL, an out-of-memory kill) cannot stop it, and the server keeps running, an
orphan. The next run stops such orphans: servers started for this project's PREFECT_HOME whose parent is gone.
"""

from __future__ import annotations

import logging
import os
import signal

import psutil

log = logging.getLogger(__name__)


def orphaned_servers(prefect_home: str) -> list[int]:
    """Pids of temporary Prefect servers for `prefect_home` that outlived the process that started them."""
    wanted = {"PREFECT__SERVER_EPHEMERAL": "1", "PREFECT_HOME": prefect_home}
    found = []
    # ad_value: a process gone meanwhile, or not ours to read, gives None instead of an error.
    for process in psutil.process_iter(["environ", "ppid"], ad_value=None):
        environment, parent = process.info["environ"] or {}, process.info["ppid"]
        if wanted.items() <= environment.items() and parent == 1:  # re-parented to init: its starter died
            found.append(process.pid)
    return found


def stop_orphaned_servers() -> list[int]:
    """Stop the temporary servers earlier runs of this project left behind; returns their pids."""
    home = os.environ.get("PREFECT_HOME")
    if not home or os.environ.get("PREFECT_API_URL"):
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
