"""`dvc repro` runs the same recipe as the flows: a campaign started for DVC alone, reproduced bit for bit, with
Python writing byte-code (which must never count as a change), registered in MLflow, plotted offline."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.test_flows import scratch_repo

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*cmd: str, cwd: Path) -> str:
    # Byte-code writing on, as Python's default: __pycache__ folders must not make a stage "changed".
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def piped(tmp_path_factory) -> Path:
    """A scratch repository whose default campaign has its pipeline written (and nothing run)."""
    repo = scratch_repo(tmp_path_factory.mktemp("piped") / "repo")
    run("pixelpick", "pipeline", cwd=repo)
    return repo


def test_a_campaigns_records_are_committable_and_its_rounds_files_are_not(piped):
    # DVC refuses a git-ignored dvc.lock: a campaign's records must be committable, its rounds' files not.
    repo = piped

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=repo).returncode == 0

    campaign = "data/runs/tiny"
    assert not any(ignored(f"{campaign}/{name}") for name in ("dvc.yaml", "dvc.lock", "params.yaml", ".gitignore",
                                                              "labels/r01.parquet.dvc", "progress.png"))
    assert ignored(f"{campaign}/rounds/r01/model.pt") and ignored(f"{campaign}/labels/r01.parquet")
    assert ignored(f"{campaign}/.lock")
    assert "__pycache__/" in (REPO / ".dvcignore").read_text()


def test_every_campaigns_pipeline_is_the_static_template_filled_in_from_the_recipe(piped, monkeypatch):
    import tasks.pipeline_files as pipeline_files
    from pixelpick.campaign import open_recorded

    folder = piped / "data/runs/tiny"
    assert (folder / "dvc.yaml").read_text() == pipeline_files.TEMPLATE.read_text()
    rounds = yaml.safe_load((folder / "pipeline-rounds.yaml").read_text())["rounds"]
    assert rounds["query"]["r01"]["previous_model"] == "rounds/r00/model.pt"
    assert rounds["query"]["r00"]["previous_model"] == rounds["query"]["r00"]["pool"]  # none: a repeated input
    sections = yaml.safe_load((folder / "step-settings.yaml").read_text())
    assert "acquire.strategy" in sections["query@r01"] and "acquire.strategy" not in sections["train@r01"]
    assert sections["train@r00"]["train.initial_epochs"] is None and "train.initial_epochs" not in sections["train@r01"]

    # A recipe input the template has no slot for is an error naming it, not a dependency silently left out.
    slots = pipeline_files.template_slots()
    monkeypatch.setattr(pipeline_files, "template_slots", lambda: {**slots, "query": [s for s in slots["query"]
                                                                                 if s != "previous_model"]})
    with pytest.raises(pipeline_files.VersioningError, match="no slot for query's previous_model"):
        pipeline_files.round_index(open_recorded(folder), piped)


def test_the_top_level_pipeline_lists_nothing_as_committed_and_is_the_template():
    import tasks.pipeline_files as pipeline_files

    committed = yaml.safe_load(run("git", "show", "HEAD:pipeline-rounds.yaml", cwd=REPO))
    assert committed == {"folder": ".", "rounds": {group: {} for group in pipeline_files.template_slots()}}
    assert pipeline_files.TEMPLATE == REPO / "dvc.yaml"  # the package's template is a link to it


def test_the_top_level_pipeline_runs_a_campaign_whose_folder_git_ignores_and_reproduces_it_bit_for_bit(tmp_path):
    # As the bundled demo: its results depend on the machine, so its folder is ignored. The flows leave it alone (git
    # stays clean); `pixelpick pipeline` points the project's top-level dvc.yaml at it, and `dvc repro` runs it.
    repo = scratch_repo(tmp_path / "repo")
    for name in ("dvc.yaml", "pipeline-rounds.yaml"):
        shutil.copy(REPO / name, repo / name)
    with (repo / ".gitignore").open("a") as ignore:
        ignore.write("/data/runs/dvc-made/\n")
    run("git", "add", ".", cwd=repo)
    run("git", "commit", "-q", "-m", "project", cwd=repo)
    assert "no data or pipelines tracked" in run("dvc", "status", cwd=repo)  # as committed, it lists no rounds

    # Started for DVC alone, with an override: it is recorded, and reaches the stage that reads it.
    made = run("pixelpick", "pipeline", "--campaign", "dvc-made", "--set", "acquire.top_fraction=0.1", cwd=repo)
    assert "dvc.yaml now runs campaign dvc-made" in made
    campaign = repo / "data/runs/dvc-made"
    assert (campaign / "params.yaml").is_file() and not (campaign / "dvc.yaml").exists()
    assert (repo / "dvc.yaml").read_bytes() == (REPO / "dvc.yaml").read_bytes()
    assert yaml.safe_load((repo / "pipeline-rounds.yaml").read_text())["folder"] == "data/runs/dvc-made"
    run("dvc", "repro", "--quiet", cwd=repo)
    run(sys.executable, "-c", "import pixelpick.recipe, tasks.steps", cwd=repo)  # writes byte-code
    assert "up to date" in run("dvc", "status", cwd=repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    settings = lock["stages"]["query@r01"]["params"]["step-settings.yaml"]["query@r01"]
    assert settings["acquire.top_fraction"] == 0.1

    # Rounds made by dvc repro are registered in MLflow like any other.
    versions = MlflowClient().search_model_versions("name = 'pixelpick-dvc-made'")
    assert sorted(v.tags["round"] for v in versions) == ["0", "1"]

    r01 = campaign / "rounds/r01"
    first = {name: md5(r01 / name) for name in ("queries.parquet", "labels.parquet", "model.pt")}
    # DVC keeps a stage's outputs (persist) and a step whose outputs match its record is fresh: deleted, they are
    # made again.
    for name in first:
        (r01 / name).unlink()
    run("dvc", "repro", "--quiet", "--force", "--single-item",
        *(f"dvc.yaml:{step}@r01" for step in ("query", "annotate", "ingest", "train")), cwd=repo)
    assert {name: md5(r01 / name) for name in first} == first
    assert "up to date" in run("dvc", "status", cwd=repo)
    # Only the top-level pipeline's records changed: nothing of the campaign's folder is in git.
    changed = run("git", "status", "--porcelain", "--untracked-files=all", cwd=repo).splitlines()
    assert sorted(changed) == [" M pipeline-rounds.yaml", "?? dvc.lock"]

    # The plots are an image: the page DVC writes needs nothing from the internet.
    run("dvc", "plots", "show", "-o", str(tmp_path / "plots"), cwd=repo)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "<img" in page and "<script" not in page

    # A project's own top-level dvc.yaml is never overwritten.
    (repo / "dvc.yaml").write_text("stages: {}\n")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    refused = subprocess.run(["pixelpick", "pipeline", "--campaign", "dvc-made"], cwd=repo, capture_output=True,
                             text=True, env={**os.environ, "PATH": path})
    assert refused.returncode != 0 and "is not PixelPick's pipeline" in refused.stderr
    assert "Traceback" not in refused.stderr and (repo / "dvc.yaml").read_text() == "stages: {}\n"


def test_a_step_run_by_hand_is_the_stage_dvc_runs_and_dvc_repro_beside_a_running_campaign_changes_nothing(piped):
    from pixelpick.locking import campaign_lock

    repo = piped  # the last of this module's tests to use it: it runs steps in it
    campaign = repo / "data/runs/tiny"
    for step in ("query", "annotate", "ingest"):
        run("pixelpick", "step", step, "--round", "0", cwd=campaign)
    shutil.rmtree(campaign / "rounds/r00/steps")  # DVC does not know our records; its own lock decides
    status = run("dvc", "status", str(campaign / "dvc.yaml"), cwd=repo)
    assert "ingest@r00" in status  # never committed: DVC says it changed, until `dvc commit` or `dvc repro`
    run("dvc", "repro", "--quiet", f"{campaign}/dvc.yaml:ingest@r00", cwd=repo)
    assert "ingest@r00" not in run("dvc", "status", str(campaign / "dvc.yaml"), cwd=repo)

    # What a running campaign has just written and not yet committed: DVC sees the stage as changed, and used to
    # delete the model before the stage's command was refused by the lock.
    run("pixelpick", "step", "train", "--round", "0", cwd=campaign)

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(campaign)): p.read_bytes() for p in sorted(campaign.rglob("*"))
                if p.is_file() and p.name != ".lock"}

    before = files()
    assert "rounds/r00/model.pt" in before and "dvc.lock" in before
    with campaign_lock(campaign / ".lock", "tiny"):
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        done = subprocess.run(["dvc", "repro", str(campaign / "dvc.yaml")], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=300)
    assert done.returncode != 0
    refusals = [line for line in done.stderr.splitlines() if f"already being run by pid {os.getpid()}" in line]
    assert len(refusals) == 1 and "Traceback" not in done.stderr, done.stderr
    assert files() == before
