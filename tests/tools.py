"""Helpers of the tests that run other programs: where the labelling tools' own virtual environments are (tests run
their code there, so the tools' pins never meet the project's: an environment variable names the python, otherwise
`.venv-tools/<tool>` in the clone, what `.ci/run` creates), and stopping a server started in a session of its own."""

from __future__ import annotations

import os
import signal
import subprocess
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
