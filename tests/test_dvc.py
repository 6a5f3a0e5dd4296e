"""`dvc repro` of the unrolled campaign in a copy of the repository reproduces a round bit for bit."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pixelpick.settings import load_settings
from tasks.versioning import render_pipeline

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*cmd: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_dvc_lock_is_not_git_ignored():
    # DVC refuses to read or write a git-ignored dvc.lock, so every `dvc commit` of a round (and `make run`) fails.
    done = subprocess.run(["git", "check-ignore", "-q", "dvc.lock"], cwd=REPO)
    if done.returncode == 128:
        pytest.skip("not a git checkout")
    assert done.returncode == 1, "dvc.lock is git-ignored: DVC cannot record rounds"


def test_committed_dvc_yaml_matches_params_yaml():
    assert (REPO / "dvc.yaml").read_text() == render_pipeline(load_settings(REPO / "params.yaml"))


def test_dvc_repro_reproduces_a_round_from_its_input_snapshot(tmp_path):
    from tests.conftest import TINY_PARAMS

    repo = tmp_path / "repo"
    repo.mkdir()
    for package in ("pixelpick", "tasks", "flows"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(TINY_PARAMS)
    (repo / ".gitignore").write_text("/data/*\n")
    (repo / "dvc.yaml").write_text(render_pipeline(load_settings(repo / "params.yaml"), repo))
    run("git", "init", "-q", cwd=repo)
    run("dvc", "init", "-q", cwd=repo)
    run("dvc", "repro", "-q", cwd=repo)

    r01 = repo / "data/runs/tiny/rounds/r01"
    first = {name: md5(r01 / name) for name in ("queries.parquet", "labels.parquet", "model.pt")}
    assert "miou" in run("dvc", "metrics", "show", cwd=repo)
    assert "up to date" in run("dvc", "status", cwd=repo)

    # Reproduce round 1 alone from round 0's snapshot and model: the same bytes come out.
    run("dvc", "repro", "-q", "--force", "--single-item", "round@r01", cwd=repo)
    assert {name: md5(r01 / name) for name in first} == first
    run("dvc", "plots", "show", "-o", str(tmp_path / "plots"), cwd=repo)
    assert (tmp_path / "plots" / "index.html").exists()
