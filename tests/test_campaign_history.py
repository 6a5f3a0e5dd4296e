"""A campaign that lives for weeks: photos keep arriving in its folder, some change or disappear, a class is appended.
What happened (each round's frozen pool, a human round's queries and job) never changes; what is derived from it is
what `dvc repro` may redo, and a code change makes exactly the derived stages stale."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flows.campaign import campaign_flow
from flows.human import query_flow, train_flow
from pixelpick.campaign import open_campaign, open_recorded
from pixelpick.pools import date, stale_labels
from pixelpick.recipe import TRAIN_STEP, run_round
from tests.fixtures import CLASSES_YAML, random_image, save_png
from tests.test_flows import choice, run, scratch_repo
from tests.test_human_flows import label_through_the_api

pytestmark = pytest.mark.slow

FOLDER_PARAMS = """
data: {dataset: folder, root: photos, eval_split: val}
model: {arch: lraspp_mobilenetv3}
train: {preset: cpu-synthetic, epochs: 1, batch_size: 4}
acquire: {pixels_per_image: 5}
campaign: {name: %s, annotator: %s, initial_pixels_per_image: 5, rounds: 1, seed: 0}
"""
SIZE = (40, 56)


def add_photos(root: Path, first: int, count: int, *, masks: bool = True, split: str = "") -> list[str]:
    """Photos (and masks: three vertical bands of classes 0, 1, 2) photo_<first>... under root/[split/]images."""
    folder = root / split if split else root
    ids = []
    for index in range(first, first + count):
        save_png(folder / "images" / f"photo_{index:02d}.png", random_image(index, SIZE))
        if masks:
            save_png(folder / "masks" / f"photo_{index:02d}.png",
                     np.repeat(np.arange(SIZE[1])[None] * 3 // SIZE[1], SIZE[0], axis=0))
        ids.append(f"images/photo_{index:02d}.png")
    return ids


def folder_repo(tmp_path: Path, name: str, annotator: str, count: int = 8) -> Path:
    repo = scratch_repo(tmp_path / "repo", params=FOLDER_PARAMS % (name, annotator))
    (repo / "photos").mkdir()
    (repo / "photos" / "classes.yaml").write_text(CLASSES_YAML)
    add_photos(repo / "photos", 0, count, masks=annotator == "simulated")
    add_photos(repo / "photos", 50, 4, split="val")
    return repo


def queried_images(campaign, round_id: int) -> set[str]:
    return set(pd.read_parquet(campaign.files(round_id).queries)["image_id"])


def test_photos_added_join_the_next_round_and_earlier_rounds_stay_fresh_and_reproducible(prefect_server, tmp_path):
    repo = folder_repo(tmp_path, "growing", "simulated")
    campaign_flow(choice(repo))
    campaign = open_recorded(repo / "data/runs/growing")
    model = campaign.files(1).model.read_bytes()
    assert len(queried_images(campaign, 1)) == 8

    new = add_photos(repo / "photos", 8, 5)
    assert "up to date" in run("dvc", "status", cwd=repo)  # no stage of rounds 0-1 depends on the folder

    campaign_flow(choice(repo, **{"campaign.rounds": 2}))
    assert set(new) <= queried_images(campaign, 2)  # round 2 draws from the grown pool
    assert not set(new) & queried_images(campaign, 1)
    assert "up to date" in run("dvc", "status", cwd=repo)
    assert len(pd.read_csv(campaign.layout.pool(2))) == 13 and len(pd.read_csv(campaign.layout.pool(1))) == 8

    # Round 1 reproduced by DVC while the folder has grown: the same model bytes. (Outputs persist: a fresh step is
    # never redone, so the model is removed first.)
    campaign.files(1).model.unlink()
    run("dvc", "repro", "--force", "--single-item", "data/runs/growing/dvc.yaml:train@r01", cwd=repo)
    assert campaign.files(1).model.read_bytes() == model

    # The records are staged in git, the pools among them.
    status = run("git", "status", "--porcelain", "data/runs/growing", cwd=repo)
    assert {f"A  data/runs/growing/pools/r0{r}.csv" for r in range(3)} <= set(status.splitlines())


def test_a_human_rounds_queries_and_job_are_history_while_the_folder_and_classes_grow(prefect_server, tmp_path):
    repo = folder_repo(tmp_path, "people", "human")
    campaign_choice = choice(repo)
    rng = np.random.default_rng(0)
    answer = lambda image_id, y, x: int(rng.integers(3))  # noqa: E731

    job = query_flow(campaign_choice, 0)
    label_through_the_api(job, answer)
    assert train_flow(campaign_choice, 0)["status"] == "trained"
    campaign = open_recorded(repo / "data/runs/people")
    history = {path: path.read_bytes() for path in (campaign.files(0).job, campaign.files(0).queries)}

    # Photos arrive and a class is appended: round 0 stays as it was, in the files and for DVC.
    new = add_photos(repo / "photos", 8, 5, masks=False)
    (repo / "photos" / "classes.yaml").write_text(CLASSES_YAML + '  - {name: membrane, colour: [0, 255, 0], key: m}\n')
    assert "up to date" in run("dvc", "status", cwd=repo)
    assert train_flow(campaign_choice, 0)["status"] == "trained"  # nothing to redo

    next_job = query_flow(campaign_choice, 1)
    assert set(new) <= queried_images(campaign, 1)
    assert {path: path.read_bytes() for path in history} == history
    assert [c["key"] for c in json.loads(Path(next_job).read_text())["classes"]][-1] == "m"
    label_through_the_api(next_job, answer)
    assert train_flow(campaign_choice, 1)["status"] == "trained"
    assert {path: path.read_bytes() for path in history} == history
    assert "up to date" in run("dvc", "status", cwd=repo)
    listed = yaml.safe_load(campaign.layout.pipeline_rounds.read_text())["rounds"]
    assert set(listed["asked"]) == {"r00", "r01"} and not listed["query"]  # frozen stages: never reproduced


def test_changed_and_removed_photos_are_reported_once_and_their_labels_leave_training(tmp_path, caplog):
    repo = folder_repo(tmp_path, "edited", "simulated")
    campaign = open_campaign(repo / "params.yaml", {"campaign.rounds": 2})
    for round_id in (0, 1):
        run_round(campaign, round_id)
    labels = pd.read_parquet(campaign.files(1).snapshot)

    save_png(repo / "photos/images/photo_03.png", random_image(99, SIZE))  # a photo edited in place
    (repo / "photos/images/photo_05.png").unlink()  # and one removed
    (repo / "photos/masks/photo_05.png").unlink()
    campaign = open_recorded(campaign.layout.dir)  # a later run: the folder as it is now
    with caplog.at_level("WARNING"):
        results = run_round(campaign, 2)
    reports = [r.getMessage() for r in caplog.records if "round 2's pool" in r.getMessage()]
    assert len(reports) == 1
    assert "images/photo_03.png (labelled in rounds 0, 1)" in reports[0]
    assert "images/photo_05.png (labelled in rounds 0, 1)" in reports[0]
    train = next(r for r in results if r.step == "train")
    stale = labels["image_id"].isin(["images/photo_03.png", "images/photo_05.png"]).sum()
    assert train.details["stale_labels_left_out"] == stale > 0
    assert "images/photo_05.png" not in queried_images(campaign, 2)


def test_each_pool_dates_its_images_so_that_training_reads_its_own_rounds_pool_only(tmp_path):
    repo = folder_repo(tmp_path, "dated", "simulated")
    campaign = open_campaign(repo / "params.yaml", {"campaign.rounds": 3})
    campaign.freeze_pool(0)
    new = add_photos(repo / "photos", 8, 2)
    campaign.freeze_pool(1)
    dated = campaign.pool_manifest(1)
    assert dict(zip(dated["image_id"], dated["since"])) == {**{i: 0 for i in campaign.pool_manifest(0)["image_id"]},
                                                            **{i: 1 for i in new}}

    # A photo changed in round 2 is current from round 2: labels made on it before are stale, as are those of a
    # photo that is gone.
    edited = dated.drop(columns="since")
    edited.loc[edited["image_id"] == "images/photo_00.png", "md5"] = "0" * 32
    redated = date(edited, dated, 2)
    assert redated.loc[redated["image_id"] == "images/photo_00.png", "since"].item() == 2
    assert redated["since"].tolist()[1:] == dated["since"].tolist()[1:]
    labels = pd.DataFrame({"image_id": ["images/photo_00.png", "images/photo_00.png", "images/photo_01.png",
                                        "images/gone.png"], "round": [1, 2, 0, 0]})
    assert stale_labels(labels, redated).tolist() == [True, False, False, True]

    # Manifests written before pools were dated are dated on reading, from the earlier rounds', and left as they are.
    for r in (0, 1):
        path = campaign.layout.pool(r)
        pd.read_csv(path).drop(columns="since").to_csv(path, index=False)
    legacy = campaign.layout.pool(1).read_bytes()
    pd.testing.assert_frame_equal(campaign.pool_manifest(1), dated)
    assert campaign.layout.pool(1).read_bytes() == legacy

    # So a round's training depends on its own pool, whatever the round.
    assert set(TRAIN_STEP.inputs(campaign, 3)) == set(TRAIN_STEP.inputs(campaign, 1)) == {"snapshot", "pool", "classes"}


def test_training_a_round_whose_pool_was_never_frozen_names_the_missing_pool(reference_campaign, tmp_path):
    from pixelpick import steps
    from pixelpick.errors import StepInputError

    shutil.copytree(reference_campaign, tmp_path / "project")  # the session's reference is never changed
    campaign = open_recorded(tmp_path / "project/data/runs/tiny")
    campaign.layout.pool(1).unlink()
    with pytest.raises(StepInputError, match=r"frozen pool .*r01\.csv, which does not exist"):
        steps.train(replace(TRAIN_STEP.prepare(campaign, 1), outputs={"model": tmp_path / "model.pt"}))


def test_a_code_change_makes_the_derived_stages_stale_and_records_carry_the_code(tmp_path):
    """In a project holding the package's code (as this repository does), every derived stage depends on it."""
    repo = scratch_repo(tmp_path / "repo")
    project = Path(__file__).resolve().parents[1]
    for package in ("pixelpick", "tasks", "flows"):
        shutil.copytree(project / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".dvcignore").write_text("__pycache__/\n*.pyc\n")
    env = {**os.environ, "PYTHONPATH": str(repo),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "campaign", "--plain", "--campaign", "coded",
                           "--set", "campaign.rounds=0"], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "flows.cli", "pipeline", "--campaign", "coded"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "-q"], cwd=repo, env=env, check=True)
    assert "up to date" in run("dvc", "status", cwd=repo)
    record = (repo / "data/runs/coded/rounds/r00/steps/train.json").read_text()
    assert '"digest"' in record and '"dirty"' in record

    with open(repo / "pixelpick" / "steps.py", "a") as code:
        code.write("\n# a change to the code\n")
    status = run("dvc", "status", cwd=repo)
    for stage in ("query@r00", "annotate@r00", "ingest@r00", "train@r00", "evaluate@r00"):
        assert f"{stage}:" in status


def test_after_edit_repro_checkout_repro_a_campaign_run_retrains_nothing_and_mlflow_follows_the_files(
        prefect_server, tmp_path):
    """The step records judge freshness; DVC's lock and MLflow's aliases follow them, whatever ran last."""
    from mlflow import MlflowClient

    from pixelpick.digests import file_md5
    from tasks.tracking import registered_model_name

    repo = scratch_repo(tmp_path / "repo")
    campaign_flow(choice(repo, **{"campaign.name": "judged"}))
    folder = repo / "data/runs/judged"
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "two rounds", cwd=repo)
    first = {r: (folder / f"rounds/r0{r}/model.pt").read_bytes() for r in (0, 1)}

    # A key only round 1 reads (its query's budget): round 0 stays as it is, round 1 is redone.
    record = folder / "params.yaml"
    record.write_text(re.sub(r"(?m)^(\s+)pixels_per_image: 10$", r"\1pixels_per_image: 5", record.read_text()))
    round_zero = folder / "rounds/r00/model.pt"
    made_before = round_zero.stat().st_mtime_ns
    run("dvc", "repro", "data/runs/judged/dvc.yaml", cwd=repo)
    assert (folder / "rounds/r01/model.pt").read_bytes() != first[1]
    assert round_zero.stat().st_mtime_ns == made_before
    run("git", "checkout", "--", "data/runs/judged/params.yaml", cwd=repo)
    run("dvc", "repro", "data/runs/judged/dvc.yaml", cwd=repo)
    assert {r: (folder / f"rounds/r0{r}/model.pt").read_bytes() for r in (0, 1)} == first

    made = {p: p.stat().st_mtime_ns for p in folder.glob("rounds/*/*") if p.is_file()}
    results = campaign_flow(choice(repo, **{"campaign.name": "judged"}))
    assert {p: p.stat().st_mtime_ns for p in made} == made  # nothing retrained, nothing rewritten
    assert "up to date" in run("dvc", "status", cwd=repo)

    client = MlflowClient()
    name = registered_model_name("judged")
    for r in (0, 1):
        version = client.get_model_version_by_alias(name, f"round-0{r}")
        assert version.tags["model"] == file_md5(folder / f"rounds/r0{r}/model.pt")
        assert str(results[r]["model_version"]) == str(version.version)
    experiment = client.get_experiment_by_name("judged")
    assert not client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
