"""The label space of a campaign may grow, never silently change: a class appended to the classes file trains and
shows its key; a class removed, renamed or reordered, or a key given to another class, is refused in one line
before anything in the campaign folder is written."""

from __future__ import annotations

import hashlib
import json
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from pixelpick.annotation.jobs import load_job
from pixelpick.annotation.progress import ProgressStore, default_progress_path
from pixelpick.annotation.server import create_app
from pixelpick.campaign import open_campaign, open_recorded
from pixelpick.checkpoints import load_previous, read_checkpoint
from pixelpick.errors import LabelSpaceError, PixelPickError
from pixelpick.human import close_job, collect_labels, export_job
from pixelpick.label_space import record_path
from pixelpick.labels import read_labels
from pixelpick.models import CLASSIFIER_LAYERS, build_model, grow_classifier
from pixelpick.probstore import ProbabilityStore
from pixelpick.recipe import STEPS, run_step
from tests.fixtures import CLASSES_YAML, random_image, save_png

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

PARAMS = """\
data: {dataset: folder, root: photos, eval_split: null}
model: {arch: lraspp_mobilenetv3}
train: {preset: cpu-synthetic, epochs: 1, batch_size: 4, warm_start: true}
acquire: {pixels_per_image: 4, class_balance: 0.5}  # weights over the grown label space
campaign: {name: photos, annotator: human, initial_pixels_per_image: 4, rounds: 3}
"""
APPENDED = CLASSES_YAML + "  - {name: debris, colour: [0, 255, 0], key: d}\n"


def start(tmp_path: Path):
    (tmp_path / "params.yaml").write_text(PARAMS)
    root = tmp_path / "photos"
    (root / "images").mkdir(parents=True)
    (root / "classes.yaml").write_text(CLASSES_YAML)
    for index in range(3):
        save_png(root / "images" / f"photo_{index}.png", random_image(index, (32, 40)))
    return open_campaign(tmp_path / "params.yaml")


def label(job_path: Path, answer) -> set[str]:
    """Label every pixel of the job through the annotator's API; returns the keys the annotator shows."""
    job = load_job(job_path)
    client = TestClient(create_app(job, ProgressStore(default_progress_path(job_path), job), job.dataset.root,
                                   rate_limit=None), base_url="http://localhost")
    keys = {c["name"]: c["key"] for c in client.get("/api/job").json()["classes"]}
    while pixels := client.post("/api/claims", json={"annotator": "ana", "count": 64}).json()["pixels"]:
        for pixel in pixels:
            body = {"annotator": "ana", **pixel, "class_id": answer(pixel["y"], pixel["x"]), "seconds": 0.5,
                    "submission_id": uuid.uuid4().hex}
            assert client.post("/api/labels", json=body).status_code == 201
    return keys


def human_round(campaign, round_id: int, answer) -> dict[str, str]:
    """What `pixelpick human query` then `human train` do, in plain Python."""
    run_step(campaign, STEPS["query"], round_id)
    keys = label(export_job(campaign, round_id), answer)
    collect_labels(campaign, round_id)
    for step in ("ingest", "train", "evaluate"):
        run_step(campaign, STEPS[step], round_id)
    close_job(campaign, round_id)
    return keys


def digests(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.md5(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_an_appended_class_trains_from_the_previous_model_and_shows_its_key(tmp_path):
    campaign = start(tmp_path)
    human_round(campaign, 0, lambda y, x: (y + x) % 3)
    assert record_path(campaign.layout).is_file()

    (tmp_path / "photos" / "classes.yaml").write_text(APPENDED)
    campaign = open_campaign(tmp_path / "params.yaml", {"campaign.name": "photos"})
    keys = human_round(campaign, 1, lambda y, x: (y + x) % 4)  # round 1 labels the new class too

    assert keys == {"background": "b", "cell": "c", "nucleus": "n", "debris": "d"}  # the annotator shows its key
    assert [c.name for c in load_job(campaign.files(1).job).classes][-1] == "debris"
    # The query read round 0's three-class model into a store of the four-class label space.
    assert ProbabilityStore(campaign.files(1).probs).num_classes == 4
    before, after = (read_checkpoint(campaign.files(r).model) for r in (0, 1))
    assert (before["num_classes"], after["num_classes"]) == (3, 4)
    assert after["label_space"]["classes"][3]["key"] == "d"
    # Round 0's labels keep their ids in round 1's snapshot, beside the new class's.
    assert set(read_labels(campaign.files(1).snapshot)["class_id"]) == {0, 1, 2, 3}

    # Warm-starting round 1 copied round 0's three classes and gave the new one fresh rows.
    model = build_model("lraspp_mobilenetv3", 4)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_previous(model, before, campaign.files(0).model)
    state = model.state_dict()
    for layer in CLASSIFIER_LAYERS["lraspp_mobilenetv3"]:
        for name in (f"{layer}.weight", f"{layer}.bias"):
            assert torch.equal(state[name][:3], before["model"][name])
            assert torch.equal(state[name][3:], fresh[name][3:])
    assert all(torch.equal(state[k], v) for k, v in before["model"].items() if k in state
               and state[k].shape == v.shape)


@pytest.mark.parametrize("arch", sorted(CLASSIFIER_LAYERS))
def test_growing_a_classifier_touches_only_the_final_convolutions(arch):
    old, new = build_model(arch, 3), build_model(arch, 5)
    grown = grow_classifier(arch, old.state_dict(), new)
    new.load_state_dict(grown)  # every tensor fits
    changed = {k for k, v in old.state_dict().items() if v.shape != grown[k].shape}
    assert changed == {f"{layer}.{p}" for layer in CLASSIFIER_LAYERS[arch] for p in ("weight", "bias")}
    for name in changed:
        assert torch.equal(grown[name][:3], old.state_dict()[name])
    with pytest.raises(ValueError):
        grow_classifier(arch, new.state_dict(), build_model(arch, 4))  # a label space never shrinks


CHANGES = {
    "removed": (CLASSES_YAML.replace("  - {name: cell, colour: [255, 0, 0], key: c}\n", ""),
                "class 'cell' (id 1) was removed, but round 0 used it"),
    "renamed": (CLASSES_YAML.replace("name: cell", "name: cells"),
                "class 'cell' (id 1) was renamed to 'cells', but round 0 used it"),
    "reordered": (CLASSES_YAML.replace("name: cell,", "name: TMP,").replace("name: nucleus,", "name: cell,")
                  .replace("name: TMP,", "name: nucleus,"),
                  "class 'cell' (id 1) was moved to id 2, but round 0 used it as id 1"),
    "key reused": (CLASSES_YAML.replace("key: c}", "key: x}") + "  - {name: debris, colour: [0, 255, 0], key: c}\n",
                   "class 'debris' (id 3) was given key 'c', which round 0 used for class 'cell' (id 1)"),
    "key changed": (CLASSES_YAML.replace("key: c}", "key: x}"),
                    "class 'cell' (id 1) changed its key from 'c' to 'x', but round 0 used it"),
}


def test_a_changed_class_is_refused_in_one_line_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the file is named as the user would type it, from where they run
    campaign = start(tmp_path)
    run_step(campaign, STEPS["query"], 0)
    export_job(campaign, 0)
    classes = tmp_path / "photos" / "classes.yaml"
    folder = campaign.layout.dir
    for change, (text, expected) in CHANGES.items():
        classes.write_text(text)
        before = digests(folder)
        for opening in (lambda: open_campaign(tmp_path / "params.yaml", {"campaign.name": "photos"}),
                        lambda: open_recorded(folder)):
            with pytest.raises(LabelSpaceError) as refused:
                opening()
            message = str(refused.value)
            assert isinstance(refused.value, PixelPickError) and "\n" not in message, change
            assert message.startswith(f"photos/classes.yaml: {expected}"), (change, message)
            assert "classes may only be appended" in message
        assert digests(folder) == before, change

    classes.write_text(APPENDED)  # appending is fine, and recorded
    open_recorded(folder)
    recorded = json.loads(record_path(campaign.layout).read_text())["classes"]
    assert [c["name"] for c in recorded][-1] == "debris"


def test_the_classes_may_change_until_a_round_uses_them(tmp_path):
    campaign = start(tmp_path)
    classes = tmp_path / "photos" / "classes.yaml"
    classes.write_text(CHANGES["removed"][0])  # no round has queried yet: nothing holds the ids
    assert open_recorded(campaign.layout.dir).pool.label_space.names == ("background", "nucleus")
    run_step(open_recorded(campaign.layout.dir), STEPS["query"], 0)
    classes.write_text(CLASSES_YAML)
    with pytest.raises(LabelSpaceError, match="class 'nucleus' \\(id 1\\) was moved to id 2"):
        open_recorded(campaign.layout.dir)


def test_a_nothing_to_do_open_writes_nothing(tmp_path):
    campaign = start(tmp_path)
    run_step(campaign, STEPS["query"], 0)
    before = {path: path.stat().st_mtime_ns for path in campaign.layout.dir.rglob("*")}
    open_recorded(campaign.layout.dir)
    open_campaign(tmp_path / "params.yaml", {"campaign.name": "photos"})
    assert {path: path.stat().st_mtime_ns for path in campaign.layout.dir.rglob("*")} == before


def test_a_campaign_started_before_classes_were_recorded_is_checked_against_its_jobs(tmp_path):
    campaign = start(tmp_path)
    run_step(campaign, STEPS["query"], 0)
    export_job(campaign, 0)
    record_path(campaign.layout).unlink()  # as a campaign started by an older PixelPick
    (tmp_path / "photos" / "classes.yaml").write_text(CHANGES["renamed"][0])
    with pytest.raises(LabelSpaceError, match="class 'cell' \\(id 1\\) was renamed to 'cells', but round 0 used"):
        open_recorded(campaign.layout.dir)
    assert not record_path(campaign.layout).exists()
    (tmp_path / "photos" / "classes.yaml").write_text(APPENDED)
    open_recorded(campaign.layout.dir)
    recorded = json.loads(record_path(campaign.layout).read_text())["classes"]
    assert [(c["name"], c["since_round"]) for c in recorded] == [
        ("background", 0), ("cell", 0), ("nucleus", 0), ("debris", 0)]
