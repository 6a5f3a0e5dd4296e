"""Round trips through Label Studio (JSON) and CVAT (for images 1.1 XML): export a job, label it elsewhere, import.

Checks against the tools' own code run them from their own virtual environments, so their pins never meet the
project's: datumaro (PIXELPICK_DATUMARO_PYTHON, else `.venv-tools/datumaro`, which `.ci/run` creates) and Label
Studio's validator (PIXELPICK_LABEL_STUDIO_PYTHON, else `.venv-tools/label-studio`); see tests/tools.py. Each is
skipped when its python is absent.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pixelpick.annotation import ProgressStore, default_progress_path, ingest_job_labels, load_job
from pixelpick.annotation.__main__ import main as annotate
from pixelpick.annotation.exchange import percent_to_pixel, pixel_to_percent, position_to_pixel
from pixelpick.annotation.jobs import write_job
from pixelpick.labels import read_labels
from pixelpick.probstore import ProbabilityWriter
from tests.test_annotation_jobs import job_document
from tests.tools import tool_python

# (H, W): widths and heights where rounding the scaled-back percent picks the wrong pixel.
SIZES = {"a.png": (5, 3), "b.png": (3, 7), "sub/c.png": (4, 480), "d.png": (2, 1000)}
NAMES = ["sky", "road", "car"]


def _pixels(height: int, width: int) -> list[list[int]]:
    # Every corner and edge, plus the middle: the places an off-by-one shows first.
    chosen = {(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1), (height // 2, width // 2),
              (height - 1, width // 3)}
    return [list(pixel) for pixel in sorted(chosen)]


def truth(image_id: str, y: int, x: int) -> int:
    return (y * 7 + x + len(image_id)) % 3


@pytest.fixture()
def job_path(tmp_path: Path) -> Path:
    images = [{"image_id": name, "height": h, "width": w, "pixels": _pixels(h, w)} for name, (h, w) in SIZES.items()]
    document = job_document(images=images)
    from pixelpick.annotation.jobs import Job

    return write_job(Job.model_validate(document), tmp_path / "rounds" / "r01" / "job.json")


def with_model(job_path: Path) -> None:
    """The round's queries (with scores) and a probability store whose argmax is `truth` at the queried pixels."""
    job = load_job(job_path)
    rows = [(image.image_id, y, x, 0.1 + 0.01 * y + 0.001 * x, 1) for image in job.images for y, x in image.pixels]
    pd.DataFrame(rows, columns=["image_id", "y", "x", "score", "round"]).to_parquet(job_path.parent / "queries.parquet")
    sizes = {image.image_id: (image.height, image.width) for image in job.images}
    with ProbabilityWriter(job_path.parent / "probs.zarr", sizes, num_classes=3, strategy="margin") as writer:
        for image in job.images:
            probs = np.full((3, image.height, image.width), 0.2, np.float32)
            for y, x in image.pixels:
                probs[truth(image.image_id, y, x), y, x] = 0.6
            writer.write(image.image_id, probs, np.zeros((image.height, image.width), np.float32))


def run_cli(*argv: str) -> None:
    annotate([str(part) for part in argv])


def expected_labels(job_path: Path) -> list[tuple[str, int, int, int]]:
    job = load_job(job_path)
    return sorted((image.image_id, y, x, truth(image.image_id, y, x)) for image in job.images for y, x in image.pixels)


def stored_labels(job_path: Path) -> list[tuple[str, int, int, int]]:
    batch = ingest_job_labels(job_path, default_progress_path(job_path), job_path.parent / "batch.parquet")
    labels = read_labels(batch)
    return sorted(zip(labels["image_id"], labels["y"].tolist(), labels["x"].tolist(), labels["class_id"].tolist(),
                      strict=True))


# --- coordinates ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 7, 480, 640, 1000, 1023, 4096])
def test_pixel_centres_in_percent_come_back_exactly(size: int) -> None:
    for index in range(size):
        percent = pixel_to_percent(index, size)
        # Label Studio's stored values carry float noise either way (e.g. 400.50000000000006 px after scaling).
        for noisy in (percent, math.nextafter(percent, 0), math.nextafter(percent, 200), percent * (1 + 4e-16)):
            assert percent_to_pixel(noisy, size) == index
        # A point on the pixel's near edge, a hair short of it after the percent round trip, is still this pixel.
        assert percent_to_pixel(math.nextafter(index / size * 100, 0), size) == index
    assert percent_to_pixel(100.0, size) == size - 1
    assert percent_to_pixel(100.01, size) is None and percent_to_pixel(-0.01, size) is None


def test_rounding_would_land_on_the_wrong_pixel() -> None:
    """Why the floor: rounding a pixel centre goes to the next pixel (ties round half to even, noise rounds up)."""
    wrong = {size: sum(round(pixel_to_percent(i, size) * size / 100) != i for i in range(size))
             for size in (3, 7, 480, 1000)}
    assert all(count > 0 for count in wrong.values()), wrong
    assert position_to_pixel(2.9999999999999996, 7) == 3


# --- Label Studio ----------------------------------------------------------------------------------------------------


def label_in_label_studio(tasks: list[dict], *, noise: float = 1 + 3e-16) -> list[dict]:
    """What Label Studio's JSON export holds after someone labelled every point: the pre-annotation's points,
    each given its true class, with the float noise of the browser's arithmetic on the coordinates."""
    exported = []
    for number, task in enumerate(copy.deepcopy(tasks), start=1):
        result = []
        for point in task["predictions"][0]["result"]:
            value = point["value"]
            width, height = point["original_width"], point["original_height"]
            x = math.floor(value["x"] * width / 100)
            y = math.floor(value["y"] * height / 100)
            value["x"] = (x + 0.5) / width * 100 * noise
            value["y"] = (y + 0.5) / height * 100 / noise
            value["keypointlabels"] = [NAMES[truth(task["data"]["image_id"], y, x)]]
            result.append({k: v for k, v in point.items() if k != "score"} | {"origin": "prediction-changed"})
        exported.append({"id": number, "data": task["data"], "predictions": [],
                         "annotations": [{"id": number, "completed_by": 1, "result": result, "was_cancelled": False,
                                          "lead_time": 3.5, "created_at": "2026-12-02T10:00:00.000000Z",
                                          "updated_at": "2026-12-02T10:00:03.500000Z"}]})
    return exported


def test_label_studio_export_has_tasks_suggestions_uncertainty_and_config(job_path: Path, tmp_path: Path) -> None:
    with_model(job_path)
    run_cli("export", "--format", "label-studio", "--job", job_path, "--out", tmp_path / "ls")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    job = load_job(job_path)
    assert [task["data"]["image_id"] for task in tasks] == [image.image_id for image in job.images]
    for task, image in zip(tasks, job.images, strict=True):
        assert task["data"]["image"] == f"/data/local-files/?d={image.image_id}"
        assert task["data"]["uncertainty"] == pytest.approx(max(0.1 + 0.01 * y + 0.001 * x for y, x in image.pixels))
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "demo-r00" and 0.3 < prediction["score"] < 0.7
        points = prediction["result"]
        assert len(points) == len(image.pixels)
        for point, (y, x) in zip(points, image.pixels, strict=True):
            assert point["type"] == "keypointlabels" and point["original_width"] == image.width
            assert percent_to_pixel(point["value"]["x"], image.width) == x
            assert percent_to_pixel(point["value"]["y"], image.height) == y
            assert point["value"]["keypointlabels"] == [NAMES[truth(image.image_id, y, x)]]
    config = ET.fromstring((tmp_path / "ls" / "config.xml").read_text())
    labels = config.find("KeyPointLabels")
    assert labels.get("snap") == "pixel" and labels.get("toName") == config.find("Image").get("name")
    assert [(label.get("value"), label.get("hotkey")) for label in labels] == [
        ("sky", "k"), ("road", "r"), ("car", "c"), ("unsure", "u")]


def test_round_zero_points_carry_no_class(job_path: Path, tmp_path: Path) -> None:
    """Without a model (or with --no-suggestions) the points come unlabelled, so nobody accepts a guess."""
    with_model(job_path)
    run_cli("export", "--format", "label-studio", "--job", job_path, "--out", tmp_path / "ls", "--no-suggestions")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert all(point["value"]["keypointlabels"] == [] for task in tasks for point in task["predictions"][0]["result"])
    assert "uncertainty" in tasks[0]["data"]  # the scores are not the model's suggestion: they stay


def test_label_studio_round_trip_is_exact(job_path: Path, tmp_path: Path, capsys) -> None:
    with_model(job_path)
    run_cli("export", "--format", "label-studio", "--job", job_path, "--out", tmp_path / "ls",
            "--image-url", "http://images.example/{image_id}")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert tasks[2]["data"]["image"] == "http://images.example/sub/c.png"
    export = tmp_path / "project-1.json"
    export.write_text(json.dumps(label_in_label_studio(tasks)))
    run_cli("import", "--format", "label-studio", "--job", job_path, "--in", export)
    total = load_job(job_path).num_pixels
    assert f"imported {total} labels (0 were there already); {total} of {total}" in capsys.readouterr().out
    assert stored_labels(job_path) == expected_labels(job_path)
    labels = read_labels(job_path.parent / "batch.parquet")
    assert set(labels["annotator"]) == {"label-studio-1"} and set(labels["round"]) == {1}
    assert labels["time"].min() == pd.Timestamp("2026-12-02T10:00:03.5Z")
    # The same export again changes nothing.
    run_cli("import", "--format", "label-studio", "--job", job_path, "--in", export)
    assert f"imported 0 labels ({total} were there already)" in capsys.readouterr().out


def test_partial_import_leaves_the_rest_to_label(job_path: Path, tmp_path: Path) -> None:
    with_model(job_path)
    run_cli("export", "--format", "label-studio", "--job", job_path, "--out", tmp_path / "ls")
    exported = label_in_label_studio(json.loads((tmp_path / "ls" / "tasks.json").read_text()))
    exported[0]["annotations"][0]["result"][0]["value"]["keypointlabels"] = []  # a point left without a class
    exported[1]["annotations"][0]["was_cancelled"] = True  # skipped in Label Studio
    (tmp_path / "export.json").write_text(json.dumps(exported))
    run_cli("import", "--format", "label-studio", "--job", job_path, "--in", tmp_path / "export.json",
            "--annotator", "ana")
    job = load_job(job_path)
    store = ProgressStore(default_progress_path(job_path), job)
    assert store.done_count() == job.num_pixels - 1 - len(job.images[1].pixels)
    assert {row["image_id"] for row in store.history("ana", limit=100)} == {"a.png", "sub/c.png", "d.png"}


def _bad_import(job_path: Path, tmp_path: Path, change) -> str:
    with_model(job_path)
    run_cli("export", "--format", "label-studio", "--job", job_path, "--out", tmp_path / "ls")
    exported = label_in_label_studio(json.loads((tmp_path / "ls" / "tasks.json").read_text()))
    change(exported)
    (tmp_path / "bad.json").write_text(json.dumps(exported))
    with pytest.raises(SystemExit) as exit_info:
        run_cli("import", "--format", "label-studio", "--job", job_path, "--in", tmp_path / "bad.json")
    assert not default_progress_path(job_path).exists()  # nothing written
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def _set(exported: list[dict], task: int, point: int, **value: object) -> None:
    exported[task]["annotations"][0]["result"][point]["value"].update(value)


def test_import_refuses_an_unknown_class(job_path: Path, tmp_path: Path) -> None:
    message = _bad_import(job_path, tmp_path, lambda e: _set(e, 2, 3, keypointlabels=["tree"]))
    assert "'tree'" in message and "sub/c.png" in message


def test_import_refuses_a_pixel_not_in_the_job(job_path: Path, tmp_path: Path) -> None:
    # Image d.png is 1000 wide and its queried pixels include x=333 and 500; x=400 was never asked.
    message = _bad_import(job_path, tmp_path, lambda e: _set(e, 3, 0, x=pixel_to_percent(400, 1000)))
    assert "did not query" in message and "400" in message


def test_import_refuses_two_labels_for_one_pixel(job_path: Path, tmp_path: Path) -> None:
    def second_annotation(exported: list[dict]) -> None:
        other = copy.deepcopy(exported[0]["annotations"][0])
        other["result"] = other["result"][:1]
        exported[0]["annotations"].append(other)

    assert "more than one label" in _bad_import(job_path, tmp_path, second_annotation)


def test_import_refuses_a_point_outside_the_image_and_a_non_task(job_path: Path, tmp_path: Path) -> None:
    assert "outside the image" in _bad_import(job_path, tmp_path, lambda e: _set(e, 0, 0, x=100.5))
    assert "not in job" in _bad_import(job_path, tmp_path, lambda e: e[0]["data"].update(image_id="zzz.png"))


def test_import_refuses_labels_that_clash_with_stored_ones(job_path: Path, tmp_path: Path) -> None:
    with_model(job_path)
    run_cli("export", "--format", "label-studio", "--job", job_path, "--out", tmp_path / "ls")
    exported = label_in_label_studio(json.loads((tmp_path / "ls" / "tasks.json").read_text()))
    (tmp_path / "first.json").write_text(json.dumps(exported[:1]))
    run_cli("import", "--format", "label-studio", "--job", job_path, "--in", tmp_path / "first.json")
    before = stored_labels_count(job_path)
    old = exported[0]["annotations"][0]["result"][0]["value"]["keypointlabels"][0]
    _set(exported, 0, 0, keypointlabels=[next(name for name in NAMES if name != old)])
    (tmp_path / "second.json").write_text(json.dumps(exported))
    with pytest.raises(SystemExit, match="already labelled"):
        run_cli("import", "--format", "label-studio", "--job", job_path, "--in", tmp_path / "second.json")
    assert stored_labels_count(job_path) == before  # the other tasks' labels were not stored either


def stored_labels_count(job_path: Path) -> int:
    return ProgressStore(default_progress_path(job_path), load_job(job_path)).done_count()


# --- CVAT ------------------------------------------------------------------------------------------------------------


def label_in_cvat(text: str) -> str:
    """Give every queried point its true class, as a person in CVAT would (coordinates kept as written)."""
    root = ET.fromstring(text)
    for image in root.iter("image"):
        for shape in image.iter("points"):
            x, y = (math.floor(float(v)) for v in shape.get("points").split(","))
            shape.set("label", NAMES[truth(image.get("name"), y, x)])
            shape.set("source", "manual")
            for attribute in list(shape):
                shape.remove(attribute)
    return ET.tostring(root, encoding="unicode")


def test_cvat_round_trip_is_exact(job_path: Path, tmp_path: Path, capsys) -> None:
    with_model(job_path)
    run_cli("export", "--format", "cvat", "--job", job_path, "--out", tmp_path / "cvat")
    text = (tmp_path / "cvat" / "annotations.xml").read_text()
    root = ET.fromstring(text)
    assert [label.findtext("name") for label in root.iter("label")] == [*NAMES, "unsure", "queried"]
    first = root.find("image").find("points")
    assert first.get("label") == "queried" and first.get("points") == "0.50,0.50"
    assert first.find("attribute").text == NAMES[truth("a.png", 0, 0)]
    (tmp_path / "done.xml").write_text(label_in_cvat(text))
    run_cli("import", "--format", "cvat", "--job", job_path, "--in", tmp_path / "done.xml")
    assert stored_labels(job_path) == expected_labels(job_path)


def test_cvat_import_scales_a_resized_image_and_skips_unlabelled_points(job_path: Path, tmp_path: Path) -> None:
    run_cli("export", "--format", "cvat", "--job", job_path, "--out", tmp_path / "cvat")
    root = ET.fromstring(label_in_cvat((tmp_path / "cvat" / "annotations.xml").read_text()))
    for image in root.iter("image"):
        if image.get("name") == "d.png":  # shown in the tool at twice the size
            image.set("width", "2000")
            image.set("height", "4")
            for shape in image.iter("points"):
                x, y = (float(v) for v in shape.get("points").split(","))
                shape.set("points", f"{2 * x:.2f},{2 * y:.2f}")
        if image.get("name") == "a.png":
            image.find("points").set("label", "queried")
    (tmp_path / "done.xml").write_text(ET.tostring(root, encoding="unicode"))
    run_cli("import", "--format", "cvat", "--job", job_path, "--in", tmp_path / "done.xml", "--annotator", "bo")
    expected = [row for row in expected_labels(job_path) if row[:3] != ("a.png", 0, 0)]
    labels = ProgressStore(default_progress_path(job_path), load_job(job_path)).completed_labels()
    got = sorted(zip(labels["image_id"], labels["y"], labels["x"], labels["class_id"], strict=True))
    assert got == expected and set(labels["annotator"]) == {"bo"}


def test_cvat_import_refuses_an_unknown_label(job_path: Path, tmp_path: Path) -> None:
    run_cli("export", "--format", "cvat", "--job", job_path, "--out", tmp_path / "cvat")
    text = label_in_cvat((tmp_path / "cvat" / "annotations.xml").read_text()).replace('label="road"', 'label="tree"')
    (tmp_path / "bad.xml").write_text(text)
    with pytest.raises(SystemExit, match=r"^error: .*'tree'"):
        run_cli("import", "--format", "cvat", "--job", job_path, "--in", tmp_path / "bad.xml")
    assert not default_progress_path(job_path).exists()


DATUMARO_PYTHON = tool_python("datumaro")
needs_datumaro = pytest.mark.skipif(
    not (DATUMARO_PYTHON.exists() and subprocess.run([DATUMARO_PYTHON, "-c", "import datumaro"],
                                                     capture_output=True).returncode == 0),
    reason=f"datumaro is not installed at {DATUMARO_PYTHON} (set PIXELPICK_DATUMARO_PYTHON)",
)

_DATUMARO_READ = """
import json, sys
from datumaro.components.annotation import AnnotationType
from datumaro.components.dataset import Dataset
dataset = Dataset.import_from(sys.argv[1], "cvat")
names = [label.name for label in dataset.categories()[AnnotationType.label]]
points = [[item.id, names[ann.label], [float(v) for v in ann.points]]
          for item in dataset for ann in item.annotations if ann.type == AnnotationType.points]
print(json.dumps(points))
"""

_DATUMARO_WRITE = """
import json, sys
import numpy as np
from datumaro.components.annotation import AnnotationType, LabelCategories, Points
from datumaro.components.dataset import Dataset
from datumaro.components.dataset_base import DatasetItem
from datumaro.components.media import Image
spec = json.load(open(sys.argv[1]))
items = [DatasetItem(id=item["id"], media=Image.from_numpy(data=np.zeros((item["height"], item["width"], 3), np.uint8),
                                                            ext=".png"),
                     annotations=[Points([x + 0.5, y + 0.5], label=label) for y, x, label in item["points"]])
         for item in spec["items"]]
dataset = Dataset.from_iterable(items, categories={AnnotationType.label: LabelCategories.from_iterable(spec["labels"])})
dataset.export(sys.argv[2], "cvat", save_media=True)
"""


def _images_beside(job_path: Path, folder: Path) -> None:
    """datumaro's CVAT reader looks for each image in images/ beside annotations.xml."""
    for image in load_job(job_path).images:
        path = folder / "images" / image.image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((image.height, image.width, 3), np.uint8)).save(path)


@needs_datumaro
def test_datumaro_reads_our_cvat_export(job_path: Path, tmp_path: Path) -> None:
    run_cli("export", "--format", "cvat", "--job", job_path, "--out", tmp_path / "cvat")
    (tmp_path / "cvat" / "annotations.xml").write_text(
        label_in_cvat((tmp_path / "cvat" / "annotations.xml").read_text()))
    _images_beside(job_path, tmp_path / "cvat")
    found = subprocess.run([DATUMARO_PYTHON, "-c", _DATUMARO_READ, tmp_path / "cvat"], capture_output=True,
                           text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-2000:]
    points = sorted((str(Path(item).with_suffix("")), math.floor(coords[1]), math.floor(coords[0]), label)
                    for item, label, coords in json.loads(found.stdout))
    expected = sorted((str(Path(image_id).with_suffix("")), y, x, NAMES[class_id])
                      for image_id, y, x, class_id in expected_labels(job_path))
    assert points == expected


@needs_datumaro
def test_we_import_what_datumaro_writes(job_path: Path, tmp_path: Path) -> None:
    job = load_job(job_path)
    labels = [*NAMES, "unsure"]
    spec = {"labels": labels, "items": [
        {"id": str(Path(image.image_id).with_suffix("")), "height": image.height, "width": image.width,
         "points": [[y, x, truth(image.image_id, y, x)] for y, x in image.pixels]} for image in job.images]}
    spec["items"][0]["points"][0][2] = labels.index("unsure")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    written = subprocess.run([DATUMARO_PYTHON, "-c", _DATUMARO_WRITE, tmp_path / "spec.json", tmp_path / "dm"],
                             capture_output=True, text=True, timeout=300)
    assert written.returncode == 0, written.stderr[-2000:]
    (xml,) = (tmp_path / "dm").rglob("*.xml")
    run_cli("import", "--format", "cvat", "--job", job_path, "--in", xml)
    expected = [(i, y, x, 255 if (i, y, x) == ("a.png", 0, 0) else c) for i, y, x, c in expected_labels(job_path)]
    assert stored_labels(job_path) == sorted(expected)


LABEL_STUDIO_PYTHON = tool_python("label-studio")
_LABEL_STUDIO_CHECK = """
import json, sys
from label_studio_sdk.label_interface import LabelInterface
interface = LabelInterface(open(sys.argv[1]).read())
interface.validate()
print(json.dumps([interface.validate_prediction(task["predictions"][0], return_errors=True)
                  for task in json.load(open(sys.argv[2]))]))
"""


@pytest.mark.skipif(not LABEL_STUDIO_PYTHON.exists(),
                    reason=f"label-studio is not installed at {LABEL_STUDIO_PYTHON} "
                           "(set PIXELPICK_LABEL_STUDIO_PYTHON)")
@pytest.mark.parametrize("suggestions", [True, False])
def test_label_studio_accepts_our_config_and_predictions(job_path: Path, tmp_path: Path, suggestions: bool) -> None:
    """Label Studio's own validator (what its server runs on a config and on imported predictions)."""
    with_model(job_path)
    run_cli("export", "--format", "label-studio", "--job", job_path, "--out", tmp_path / "ls",
            *([] if suggestions else ["--no-suggestions"]))
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    tasks.append(copy.deepcopy(tasks[0]))
    tasks[-1]["predictions"][0]["result"][0]["value"]["keypointlabels"] = ["tree"]  # the validator does look
    (tmp_path / "ls" / "tasks.json").write_text(json.dumps(tasks))
    checked = subprocess.run([LABEL_STUDIO_PYTHON, "-c", _LABEL_STUDIO_CHECK, tmp_path / "ls" / "config.xml",
                              tmp_path / "ls" / "tasks.json"], capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stderr[-2000:]
    errors = json.loads(checked.stdout)
    assert errors[:-1] == [[]] * len(SIZES)
    assert errors[-1] and "tree" in str(errors[-1])
