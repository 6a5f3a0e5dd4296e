"""Prefect's temporary server, when a run dies without stopping it.

Without PREFECT_API_URL, Prefect starts a temporary server in a child process and stops it when the flow's process
exits. A process killed outright (SIGKILL, an out-of-memory kill) cannot stop it, and the server keeps running, an
orphan. The next run stops such orphans: servers started for this project's PREFECT_HOME whose parent is gone.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys

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


# Prefect starts its temporary server in the terminal's process group, so Ctrl-C (SIGINT to the whole group) and a
# group SIGTERM (systemd, docker) reach the server too: it dies first, and the flow's clean-up (marking the flow
# run, the MLflow run) then waits minutes on a dead API before failing with a traceback. In a session of its own the
# server hears only the flow's process, which stops it at exit (and the next run stops it if that process is
# killed outright).
SERVER_MODULE = "prefect.server.api.server"


class _OwnSession:
    """`subprocess` as Prefect's server module sees it, every process started in a new session."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):  # noqa: N802  (subprocess's name)
        return subprocess.Popen(*args, **{**kwargs, "start_new_session": True})


def _own_session(module) -> None:
    module.subprocess = _OwnSession()


class _WhenImported(importlib.abc.MetaPathFinder):
    """Applies `_own_session` to Prefect's server module when something imports it: importing it here would cost
    seconds on the commands that answer without starting a server."""

    def find_spec(self, name, path, target=None):
        if name != SERVER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            execute(module)
            _own_session(module)

        spec.loader.exec_module = exec_module
        return spec


def temporary_server_apart() -> None:
    """Start Prefect's temporary server (when this process starts one) apart from the terminal's signals."""
    if os.environ.get("PREFECT_API_URL"):
        return
    if SERVER_MODULE in sys.modules:
        _own_session(sys.modules[SERVER_MODULE])
    elif not any(isinstance(finder, _WhenImported) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WhenImported())


# A flow run whose process is killed outright stays RUNNING in Prefect forever: nothing is left to report its end.
# Each flow command tags its runs with the process running them, so the next run can tell which RUNNING runs have
# no process any more and mark them Crashed.
OWNER_TAG = "pixelpick.process:"


def owner_tag() -> str:
    """This process, as a flow run's tag: host, pid and start time (a pid alone may be reused)."""
    return f"{OWNER_TAG}{socket.gethostname()}:{os.getpid()}:{_started_since_boot(psutil.Process())}"


def _started_since_boot(process: psutil.Process) -> str:
    """When `process` started, in seconds since the machine booted. Not its start time on the clock: psutil derives
    that from the boot time the kernel reports, which moves whenever the clock is stepped (NTP, a virtual machine
    synchronising with its host), and a live process would then look like another one with its pid."""
    return f"{process.create_time() - psutil.boot_time():.2f}"


def _owner_gone(tag: str) -> bool:
    try:
        host, pid, started = tag.removeprefix(OWNER_TAG).rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():  # another machine's run: not ours to judge
        return False
    try:
        return _started_since_boot(psutil.Process(pid)) != started
    except psutil.NoSuchProcess:
        return True


def crash_abandoned_flow_runs() -> list[str]:
    """Mark Crashed the flow runs (and their task runs) left RUNNING or PENDING by a process of this project that is
    gone; returns their names. Needs the Prefect API: call it inside a flow."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    unfinished = [StateType.RUNNING, StateType.PENDING]
    message = "its process was killed (found by a later pixelpick command)"
    crashed = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=unfinished))))
        abandoned = [run for run in runs if any(t.startswith(OWNER_TAG) and _owner_gone(t) for t in run.tags)]
        for run in abandoned:
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            crashed.append(run.name)
        if abandoned:
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id for run in abandoned])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=unfinished))))
            for task_run in tasks:
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            log.warning("marked %d flow run(s) Crashed, left running by a killed process: %s", len(crashed),
                        ", ".join(crashed))
    return crashed
