"""The campaign and round flows under a real (temporary) Prefect server, in a scratch git + DVC repository, with
MLflow on a SQLite file: versioning, lineage, caching by content, loadable models."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from flows.campaign import campaign_flow
from flows.parameters import CampaignChoice
from pixelpick.campaign import open_recorded
from pixelpick.digests import file_md5
from tasks.tracking import registered_model_name
from tests.conftest import TINY_PARAMS

pytestmark = pytest.mark.slow


def run(*cmd: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def scratch_repo(folder: Path, params: str = TINY_PARAMS) -> Path:
    """A git + DVC repository holding a params.yaml, as a project using PixelPick would."""
    shutil.copytree(_empty_repo(), folder, symlinks=True, dirs_exist_ok=True)
    (folder / "params.yaml").write_text(params)
    (folder / ".gitignore").write_text("/data/synthetic/\n/data/cache/\n")  # each campaign ignores its own rounds
    return folder


@functools.cache
def _empty_repo() -> Path:
    """`git init` and `dvc init` once per test process (a DVC start each time): scratch repositories are copies."""
    folder = Path(tempfile.mkdtemp(prefix="empty-repo-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    run("git", "init", "-q", cwd=folder)
    run("git", "config", "user.email", "test@example.com", cwd=folder)
    run("git", "config", "user.name", "test", cwd=folder)
    run("dvc", "init", "-q", cwd=folder)
    return folder


def choice(folder: Path, **overrides) -> CampaignChoice:
    return CampaignChoice(params=str(folder / "params.yaml"), overrides=overrides)


def test_a_campaign_is_versioned_tracked_and_cached_by_content(prefect_server, tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    # Round 0 trains 3 epochs (train.initial_epochs), later rounds 2 (train.epochs).
    results = campaign_flow(choice(repo, **{"campaign.name": "flow-lineage", "train.initial_epochs": 3}))
    assert [r["round"] for r in results] == [0, 1]
    campaign = open_recorded(repo / "data" / "runs" / "flow-lineage")

    # DVC: dvc.lock records exactly what ran; nothing is out of date.
    assert "up to date" in run("dvc", "status", cwd=repo)
    lock = json.dumps(__import__("yaml").safe_load((campaign.layout.dir / "dvc.lock").read_text()))
    assert file_md5(campaign.files(1).snapshot) in lock and file_md5(campaign.files(1).model) in lock

    # MLflow: one version per round, lineage tags, aliases, the parent run finished, the experiment shows runs.
    client = MlflowClient()
    name = registered_model_name("flow-lineage")
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert [v.tags["round"] for v in versions] == ["0", "1"]
    for version in versions:
        files = campaign.files(int(version.tags["round"]))
        assert version.tags["snapshot_md5"] == file_md5(files.snapshot)
        assert version.tags["model"] == file_md5(files.model)
    assert versions[0].tags["queries_from_model_version"] == "random"
    assert versions[1].tags["queries_from_model_version"] == str(versions[0].version)
    assert str(client.get_model_version_by_alias(name, "round-01").version) == str(versions[1].version)
    experiment = client.get_experiment_by_name("flow-lineage")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.search_runs([experiment.experiment_id], "tags.`pixelpick.kind` = 'campaign'")
    assert [run_.info.status for run_ in parent] == ["FINISHED"]
    round_run = client.get_run(versions[1].run_id)
    assert round_run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert round_run.data.metrics["query_queried_pixels"] == 10 * len(campaign.pool)
    # The params are what each round's steps keyed on: round 0 trained initial_epochs and queried at random.
    first, second = (client.get_run(v.run_id).data.params for v in versions)
    assert first["train.initial_epochs"] == "3" and "train.epochs" not in first and "acquire.strategy" not in first
    assert second["train.epochs"] == "2" and "train.initial_epochs" not in second
    assert second["acquire.pixels_per_image"] == "10" and "train.device" not in second

    # A registered version is a model MLflow loads and predicts with.
    model = mlflow.pyfunc.load_model(f"models:/{name}@best")
    image = campaign.pool.load_image(campaign.pool.image_ids[0])
    out = model.predict(image[None])
    assert out["labels"].shape == (1, *image.shape[:2])
    assert out["probabilities"].shape == (1, campaign.pool.label_space.num_classes, *image.shape[:2])
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1, atol=1e-4)

    # Running it again (as a scheduled run of a finished campaign would): every step is cached and answers with
    # its own result, nothing is logged twice, nothing changes on disk.
    before = {p: p.read_bytes() for p in (campaign.files(1).snapshot, campaign.files(1).model)}
    again = campaign_flow(choice(repo, **{"campaign.name": "flow-lineage"}))
    assert [r["model_version"] for r in again] == [r["model_version"] for r in results]
    assert {p: p.read_bytes() for p in before} == before
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    assert "up to date" in run("dvc", "status", cwd=repo)

    # From the command line, a finished campaign answers from its records: no flow, no Prefect server, no write
    # anywhere (MLflow's database included).
    def state():
        files = [*repo.rglob("*"), Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))]
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file() and ".git" not in p.parts}

    before = state()
    answer = run("pixelpick", "campaign", "--campaign", "flow-lineage", cwd=repo)
    assert "nothing to do" in answer and "Flow run" not in answer
    assert state() == before


def test_overrides_and_extension_are_versioned_and_nothing_finished_is_redone(prefect_server, tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    overrides = {"campaign.name": "overridden", "acquire.strategy": "entropy", "train.epochs": 1}
    campaign_flow(choice(repo, **overrides))
    lock = __import__("yaml").safe_load((repo / "data/runs/overridden/dvc.lock").read_text())
    assert lock["stages"]["query@r01"]["params"]["step-settings.yaml"]["query@r01"]["acquire.strategy"] == "entropy"
    assert lock["stages"]["train@r01"]["params"]["step-settings.yaml"]["train@r01"]["train.epochs"] == 1

    # One more round: rounds 0 and 1 are not redone (no step of theirs runs again), round 2 runs.
    rounds = repo / "data/runs/overridden/rounds"
    records = {p: p.stat().st_mtime_ns for p in rounds.glob("r0[01]/steps/*.json")}
    campaign_flow(choice(repo, **{**overrides, "campaign.rounds": 2}))
    assert {p: p.stat().st_mtime_ns for p in rounds.glob("r0[01]/steps/*.json")} == records
    assert (rounds / "r02" / "model.pt").is_file()
    assert "up to date" in run("dvc", "status", cwd=repo)


class Killed(Exception):
    """Stands for the process dying at that point."""


def test_a_round_killed_inside_a_step_reruns_to_the_same_snapshot(prefect_server, tmp_path, monkeypatch,
                                                                  reference_campaign):
    import pixelpick.labels as labels_module
    import pixelpick.steps as steps_module

    # What the same settings give uninterrupted (the plain loop runs the same steps as the flow).
    reference = reference_campaign / "data/runs/tiny/rounds"
    expected = [json.loads((reference / f"r{r:02d}/metrics.json").read_text())["labelled_pixels"] for r in (0, 1)]
    reference_snapshot = (reference / "r01/labels.parquet").read_bytes()

    repo = scratch_repo(tmp_path / "b")
    with monkeypatch.context() as patch:  # round 0 dies while training
        patch.setattr(steps_module, "fit", lambda *a, **k: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            campaign_flow(choice(repo, **{"campaign.name": "crash"}))
    real_write = labels_module._write_atomic

    def die_writing_round_1(labels, path):
        if "r01" in str(path):
            raise Killed()
        real_write(labels, path)

    with monkeypatch.context() as patch:  # round 1 dies inside ingest, in the middle of the write
        patch.setattr(labels_module, "_write_atomic", die_writing_round_1)
        with pytest.raises(Killed):
            campaign_flow(choice(repo, **{"campaign.name": "crash"}))
    experiment = MlflowClient().get_experiment_by_name("crash")
    statuses = {r.info.status for r in MlflowClient().search_runs([experiment.experiment_id],
                                                                  "tags.`pixelpick.kind` = 'campaign'")}
    assert statuses == {"FAILED"}

    results = campaign_flow(choice(repo, **{"campaign.name": "crash"}))
    assert [r["labelled_pixels"] for r in results] == expected
    assert (repo / "data/runs/crash/rounds/r01/labels.parquet").read_bytes() == reference_snapshot
