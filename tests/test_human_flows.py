"""Rounds labelled by people: the query flow exports a job, labels arrive through the annotator's API, the train
flow collects, versions and trains on them; `dvc repro` reproduces a human round from its versioned batch alone."""

from __future__ import annotations

import shutil
import uuid
import warnings

import numpy as np
import pytest

from flows.human import query_flow, train_flow
from pixelpick.annotation.jobs import load_job
from pixelpick.annotation.progress import ProgressStore, default_progress_path
from pixelpick.annotation.server import create_app
from pixelpick.campaign import open_recorded
from pixelpick.labels import read_labels
from tests.fixtures import CLASSES_YAML, random_image, save_png
from tests.test_flows import choice, run, scratch_repo

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.slow

HUMAN = {"campaign.annotator": "human"}


def label_through_the_api(job_path, answer, annotator="ana", limit=None) -> int:
    """An annotator labels the job's pixels through the web annotator's API; `answer(image_id, y, x)` is the class."""
    job = load_job(job_path)
    store = ProgressStore(default_progress_path(job_path), job)
    client = TestClient(create_app(job, store, job.dataset.root, rate_limit=None), base_url="http://localhost")
    done = 0
    while limit is None or done < limit:
        pixels = client.post("/api/claims", json={"annotator": annotator, "count": 16}).json()["pixels"]
        if not pixels:
            break
        for pixel in pixels[: None if limit is None else limit - done]:
            body = {"annotator": annotator, **pixel, "class_id": answer(pixel["image_id"], pixel["y"], pixel["x"]),
                    "seconds": 0.8, "submission_id": uuid.uuid4().hex}
            assert client.post("/api/labels", json=body).status_code == 201
            done += 1
    return done


def test_a_human_round_is_versioned_tracked_and_reproduced_from_its_batch(prefect_server, tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    campaign_choice = choice(repo, **HUMAN, **{"campaign.name": "people"})
    job_path = query_flow(campaign_choice, 0)
    campaign = open_recorded(repo / "data/runs/people")
    truth = lambda image_id, y, x: int(campaign.pool.load_mask(image_id)[y, x])  # noqa: E731

    assert label_through_the_api(job_path, truth, "ana", limit=5) == 5
    waiting = train_flow(campaign_choice, 0)
    assert waiting["status"] == "waiting" and waiting["done"] == 5
    assert not campaign.files(0).model.exists()
    label_through_the_api(job_path, truth, "ben")  # everything but what ana holds
    label_through_the_api(job_path, truth, "ana")  # ana finishes hers
    assert train_flow(campaign_choice, 0)["status"] == "trained"

    labels = read_labels(campaign.files(0).snapshot)
    assert len(labels) == 10 * len(campaign.pool)
    assert set(labels["source"]) == {"human"} and set(labels["annotator"]) == {"ana", "ben"}
    assert (campaign.layout.dir / "labels" / "r00.parquet.dvc").is_file()  # the batch is a versioned input
    assert "up to date" in run("dvc", "status", cwd=repo)
    # Once ingested, the job is closed to further edits.
    store = ProgressStore(default_progress_path(job_path), load_job(job_path))
    assert store.closed_info() is not None

    # Round 1: the next pixels come from round 0's model and never repeat a labelled pixel.
    next_job = load_job(query_flow(campaign_choice, 1))
    asked = {(i.image_id, y, x) for i in next_job.images for y, x in i.pixels}
    assert not asked & set(zip(labels["image_id"], labels["y"], labels["x"]))
    label_through_the_api(campaign.files(1).job, truth)
    assert train_flow(campaign_choice, 1)["status"] == "trained"
    assert "up to date" in run("dvc", "status", cwd=repo)
    # The campaign's records are staged in git, ready to commit, not left untracked.
    status = run("git", "status", "--porcelain", "--untracked-files=all", "data/runs/people", cwd=repo)
    records = ("params.yaml", "dvc.yaml", "pipeline-rounds.yaml", "step-settings.yaml", "dvc.lock", ".gitignore",
               "labels/r00.parquet.dvc", "labels/r01.parquet.dvc")
    assert {f"A  data/runs/people/{name}" for name in records} <= set(status.splitlines()), status
    assert "??" not in status, status
    snapshot = campaign.files(1).snapshot.read_bytes()
    model = campaign.files(1).model.read_bytes()

    # In a copy of the repository without the pool's ground truth, `dvc repro --force` of the human round
    # rebuilds its snapshot and model bit for bit from the versioned batch: the masks are never read.
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, symlinks=True)
    shutil.rmtree(copy / "data/synthetic/trainannot")
    for output in ("labels.parquet", "model.pt"):  # outputs persist: a fresh step is never redone
        (copy / "data/runs/people/rounds/r01" / output).unlink()
    for stage in ("ingest@r01", "train@r01"):
        run("dvc", "repro", "--force", "--single-item", f"data/runs/people/dvc.yaml:{stage}", cwd=copy)
    assert (copy / "data/runs/people/rounds/r01/labels.parquet").read_bytes() == snapshot
    assert (copy / "data/runs/people/rounds/r01/model.pt").read_bytes() == model


# A human campaign on a folder of one's own images, without evaluation masks.
OWN_IMAGES_PARAMS = """
data: {dataset: folder, root: photos, eval_split: null}
model: {arch: lraspp_mobilenetv3}
train: {preset: cpu-synthetic, epochs: 1, batch_size: 4}
acquire: {pixels_per_image: 5}
campaign: {name: photos, annotator: human, initial_pixels_per_image: 5, rounds: 1}
"""


def write_own_images(root, count=8, size=(40, 56)):
    """A folder of one's own images and a classes file: no masks at all."""
    (root / "classes.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text(CLASSES_YAML)
    for index in range(count):
        save_png(root / "images" / f"photo_{index}.png", random_image(index, size))
    return root


def test_a_campaign_on_ones_own_images_without_any_mask_works_with_people(prefect_server, tmp_path):
    repo = scratch_repo(tmp_path / "repo", params=OWN_IMAGES_PARAMS)
    write_own_images(repo / "photos")
    campaign_choice = choice(repo)
    rng = np.random.default_rng(0)
    answer = lambda image_id, y, x: int(rng.integers(3))  # noqa: E731  (someone labelling by eye)

    for round_id in (0, 1):
        job = query_flow(campaign_choice, round_id)
        assert label_through_the_api(job, answer) == 5 * 8
        trained = train_flow(campaign_choice, round_id)
        assert trained["status"] == "trained"
        assert trained["miou"] is None and "not measured" in trained["not_measured"]
        assert trained["labelled_pixels"] == 5 * 8 * (round_id + 1)
    assert "up to date" in run("dvc", "status", cwd=repo)
    assert (repo / "data/runs/photos/rounds/r01/model.pt").is_file()


def test_rounds_labelled_in_cvat_and_label_studio_are_trained_like_any_other(prefect_server, tmp_path):
    """Round 0 goes through CVAT XML, round 1 through Label Studio JSON with the model's suggestions; `human train`
    collects both like labels from the built-in annotator."""
    import json
    import math
    import xml.etree.ElementTree as ET

    from pixelpick.annotation.__main__ import main as annotate

    repo = scratch_repo(tmp_path / "repo", params=OWN_IMAGES_PARAMS)
    write_own_images(repo / "photos", size=(37, 53))  # odd sizes: percent coordinates are not round numbers
    campaign_choice = choice(repo)
    answer = lambda image_id, y, x: (3 * y + x) % 3  # noqa: E731

    job = query_flow(campaign_choice, 0)
    names = [info.name for info in load_job(job).classes]
    annotate(["export", "--format", "cvat", "--job", job, "--out", str(tmp_path / "cvat")])
    root = ET.parse(tmp_path / "cvat" / "annotations.xml").getroot()
    for image in root.iter("image"):
        for shape in image.iter("points"):
            x, y = (math.floor(float(v)) for v in shape.get("points").split(","))
            shape.set("label", names[answer(image.get("name"), y, x)])
    ET.ElementTree(root).write(tmp_path / "cvat-done.xml")
    annotate(["import", "--format", "cvat", "--job", job, "--in", str(tmp_path / "cvat-done.xml")])
    assert train_flow(campaign_choice, 0)["status"] == "trained"

    job = query_flow(campaign_choice, 1)
    annotate(["export", "--format", "label-studio", "--job", job, "--out", str(tmp_path / "ls")])
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert all(point["value"]["keypointlabels"] for task in tasks for point in task["predictions"][0]["result"])
    for number, task in enumerate(tasks):
        result = task.pop("predictions")[0]["result"]
        for point in result:
            x = math.floor(point["value"]["x"] * point["original_width"] / 100)
            y = math.floor(point["value"]["y"] * point["original_height"] / 100)
            point["value"]["keypointlabels"] = [names[answer(task["data"]["image_id"], y, x)]]
        task["annotations"] = [{"id": number, "completed_by": 7, "result": result, "lead_time": 10.0}]
    (tmp_path / "ls-export.json").write_text(json.dumps(tasks))
    annotate(["import", "--format", "label-studio", "--job", job, "--in", str(tmp_path / "ls-export.json")])
    assert train_flow(campaign_choice, 1)["status"] == "trained"

    campaign = open_recorded(repo / "data/runs/photos")
    labels = read_labels(campaign.files(1).snapshot)
    assert len(labels) == 2 * 5 * 8
    assert (labels["class_id"] == [answer(*key) for key in zip(labels["image_id"], labels["y"], labels["x"])]).all()
    assert set(labels["source"]) == {"human"}
    assert dict(labels.groupby("round")["annotator"].unique().map(list)) == {0: ["cvat"], 1: ["label-studio-7"]}
    assert "up to date" in run("dvc", "status", cwd=repo)
