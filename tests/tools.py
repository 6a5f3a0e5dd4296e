"""Helpers of the tests that run other programs: where the labelling tools' own virtual environments are (tests run
their code there, so the tools' pins never meet the project's: an environment variable names the python, otherwise
`.venv-tools/<tool>` in the clone, what `.ci/run` creates), and stopping a server started in a session of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]


def tool_python(tool: str) -> Path:
    """The python of `tool`'s environment ("label-studio" or "datumaro"); it may not exist."""
    variable = f"PIXELPICK_{tool.upper().replace('-', '_')}_PYTHON"
    if os.environ.get(variable):
        return Path(os.environ[variable])
    return REPO / ".venv-tools" / tool / "bin" / "python"


def stop_process_group(process: subprocess.Popen, log: IO, timeout: float) -> None:
    """Stop a server started with `start_new_session=True` (it and its workers), killing it if it lingers."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()


def wait_until_serving(process: subprocess.Popen, ready: Callable[[], bool], *, timeout: float, log: Path,
                       what: str, poll: float = 0.5) -> None:
    """Wait until `ready()` (connection errors count as not yet); fail the test with the server's log if the
    server exits or `timeout` seconds pass."""
    import httpx
    import pytest

    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(poll)
