"""The `pixelpick` command line as a user runs it (subprocesses), on a tiny campaign: the README's commands work,
and bad input gets one line naming the problem, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_PARAMS
from tests.test_flows import scratch_repo

pytestmark = pytest.mark.slow


def pixelpick(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if PREFECT_API_URL.value():  # the test session's server, so each command need not start its own
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    done = subprocess.run(["pixelpick", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if ok:
        assert done.returncode == 0, f"pixelpick {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_the_readme_commands_run(prefect_server, tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    campaign = pixelpick("campaign", cwd=repo)
    assert "round" in campaign.stdout + campaign.stderr
    again = pixelpick("round", "1", cwd=repo)
    assert "round 1:" in again.stdout and "model version" in again.stdout

    query = pixelpick("human", "query", "0", "--campaign", "people", "--set", "campaign.annotator=human", cwd=repo)
    assert "annotation job ready" in query.stdout + query.stderr
    assert (repo / "data/runs/people/rounds/r00/job.json").is_file()

    pixelpick("predict", "--model", "models:/pixelpick-tiny@best", "--images", "data/synthetic/val",
              "--out", "predictions", cwd=repo)
    first = sorted((repo / "data/synthetic/val").glob("*.png"))[0]
    label_map = Image.open(repo / "predictions" / first.name)
    assert label_map.mode == "P" and label_map.size == Image.open(first).size
    assert np.asarray(label_map).max() < 11


@pytest.mark.parametrize("args, problem", [
    (("campaign", "--set", "train.epochz=2"), r"train\.epochz"),
    (("campaign", "--set", "data.dataset=camvid", "--set", "data.root=/no/such/camvid"), "/no/such/camvid"),
    (("round", "3", "--campaign", "never-started"), "has not started"),
])
def test_bad_input_is_one_line_and_debug_shows_the_traceback(prefect_server, tmp_path, args, problem):
    import re

    # Refused before anything is versioned: a folder holding the params file is enough (no git, no DVC to set up);
    # the session's Prefect server spares a flow command its own temporary one.
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(TINY_PARAMS)
    done = pixelpick(*args, cwd=repo, ok=False)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(problem, errors[0]), done.stderr
    assert "Traceback" not in done.stderr
    debug = pixelpick("--debug", *args, cwd=repo, ok=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_malformed_label_batch_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    pixelpick("pipeline", "--set", "campaign.annotator=human", cwd=repo)
    campaign = repo / "data/runs/tiny"
    pixelpick("step", "query", "--round", "0", cwd=campaign)
    (campaign / "labels").mkdir()
    (campaign / "labels" / "r00.parquet").write_bytes(b"not parquet at all")
    done = pixelpick("step", "ingest", "--round", "0", cwd=campaign, ok=False)
    assert done.returncode == 1
    assert "r00.parquet is not a readable Parquet file" in done.stderr and "Traceback" not in done.stderr
    assert not (campaign / "rounds/r00/labels.parquet").exists()
