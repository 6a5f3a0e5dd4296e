"""Where the labelling tools' own virtual environments are: tests run their code there, so the tools' pins never
meet the project's. An environment variable names the python; otherwise `.venv-tools/<tool>` in the clone (what
`.ci/run` creates), then /work/tools-venvs/<tool>."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tool_python(tool: str) -> Path:
    """The python of `tool`'s environment ("label-studio" or "datumaro"); it may not exist."""
    variable = f"PIXELPICK_{tool.upper().replace('-', '_')}_PYTHON"
    if os.environ.get(variable):
        return Path(os.environ[variable])
    candidates = [REPO / ".venv-tools" / tool / "bin" / "python", Path("/work/tools-venvs") / tool / "bin" / "python"]
    return next((path for path in candidates if path.exists()), candidates[0])
