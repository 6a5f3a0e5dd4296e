"""Annotation jobs (format, validation, splitting), key bindings, and the progress store behind the annotator."""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pixelpick.annotation import ProgressStore, Submission, export_job, ingest_job_labels, load_job, split_job
from pixelpick.annotation.jobs import write_job
from pixelpick.annotation.keys import parse_key_overrides, resolve_key_bindings
from pixelpick.annotation.progress import PixelRef
from pixelpick.datasets.folder import FolderDataset
from pixelpick.errors import (
    AnnotationJobError,
    JobClosedError,
    KeyBindingError,
    PixelConflictError,
    ProgressDatabaseError,
    SubmissionRejectedError,
    UnknownImageError,
)
from pixelpick.labels import LABEL_COLUMNS, read_labels

CLASSES = [
    {"name": "sky", "colour": [70, 130, 180], "key": "k"},
    {"name": "road", "colour": [128, 64, 128], "key": "r"},
    {"name": "car", "colour": [0, 0, 142], "key": "c"},
]
IGNORE = 255


def make_dataset(root: Path, sizes: dict[str, tuple[int, int]]) -> FolderDataset:
    """A folder dataset of plain grey PNGs of the given (H, W) sizes, with the three classes above."""
    (root / "images").mkdir(parents=True)
    root.joinpath("classes.yaml").write_text(yaml.safe_dump({"ignore_index": IGNORE, "classes": CLASSES}))
    for name, (height, width) in sizes.items():
        Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(root / "images" / name)
    return FolderDataset(root, "train")


def job_document(**changes: object) -> dict:
    """A valid job as a dict: two images, 3 + 2 pixels."""
    document = {
        "format": "pixelpick-annotation-job",
        "version": 1,
        "job_id": "demo-r01",
        "campaign": "demo",
        "round": 1,
        "created": "2026-11-01T12:00:00+00:00",
        "dataset": {"name": "folder", "root": "data/demo"},
        "classes": [{"id": i, **info} for i, info in enumerate(CLASSES)],
        "ignore_index": IGNORE,
        "images": [
            {"image_id": "images/a.png", "height": 4, "width": 6, "pixels": [[0, 0], [1, 2], [3, 5]]},
            {"image_id": "images/b.png", "height": 4, "width": 6, "pixels": [[2, 2], [0, 1]]},
        ],
    }
    document.update(changes)
    return document


def write_document(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document))
    return path


# --- export and load --------------------------------------------------------------------------------------------


def test_export_job_lists_images_sorted_and_pixels_row_major(tmp_path):
    dataset = make_dataset(tmp_path / "data", {"b.png": (5, 7), "a.png": (4, 6)})
    queries = pd.DataFrame(
        [("images/b.png", 4, 6), ("images/a.png", 3, 0), ("images/b.png", 0, 2), ("images/a.png", 1, 5)],
        columns=["image_id", "y", "x"],
    )
    path = export_job(queries, dataset, job_id="demo-r02", campaign="demo", round_id=2, path=tmp_path / "job.json")

    job = load_job(path)
    assert (job.job_id, job.campaign, job.round, job.ignore_index) == ("demo-r02", "demo", 2, IGNORE)
    assert job.dataset.root == str(tmp_path / "data")
    assert [(c.id, c.name, c.colour, c.key) for c in job.classes] == [
        (0, "sky", (70, 130, 180), "k"), (1, "road", (128, 64, 128), "r"), (2, "car", (0, 0, 142), "c")
    ]
    assert [(i.image_id, i.height, i.width, i.pixels) for i in job.images] == [
        ("images/a.png", 4, 6, ((1, 5), (3, 0))),
        ("images/b.png", 5, 7, ((0, 2), (4, 6))),
    ]
    assert job.num_pixels == 4
    assert job.created.utcoffset().total_seconds() == 0
    assert list(tmp_path.glob(".job.json*")) == []  # no temporary file left behind


def test_export_job_rejects_bad_queries(tmp_path):
    dataset = make_dataset(tmp_path / "data", {"a.png": (4, 6)})
    export = dict(dataset=dataset, job_id="j", campaign="c", round_id=0, path=tmp_path / "job.json")
    with pytest.raises(AnnotationJobError, match="lack the columns"):
        export_job(pd.DataFrame({"image_id": ["images/a.png"], "y": [0]}), **export)
    with pytest.raises(AnnotationJobError, match=r"images\.0: pixels\[1\] = \[1, 1\] is a duplicate pixel"):
        export_job(pd.DataFrame({"image_id": ["images/a.png"] * 2, "y": [1, 1], "x": [1, 1]}), **export)
    with pytest.raises(AnnotationJobError, match=r"\[4, 0\] is out of bounds of the 4x6 image"):
        export_job(pd.DataFrame({"image_id": ["images/a.png"], "y": [4], "x": [0]}), **export)
    with pytest.raises(UnknownImageError, match="images/zzz.png"):
        export_job(pd.DataFrame({"image_id": ["images/zzz.png"], "y": [0], "x": [0]}), **export)
    assert not (tmp_path / "job.json").exists()


def test_write_and_load_round_trip(tmp_path):
    job = load_job(write_document(tmp_path / "in.json", job_document()))
    assert load_job(write_job(job, tmp_path / "out.json")) == job


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "unknown version 2; this PixelPick reads version 1"),
        ({"format": "via-project"}, "field 'format' must be 'pixelpick-annotation-job'"),
        ({"extra": 1}, "extra: Extra inputs are not permitted"),
        ({"round": -1}, "round: Input should be greater than or equal to 0"),
        ({"job_id": "../evil"}, "job_id: String should match pattern"),
        ({"created": "2026-11-01T12:00:00"}, "created: Input should have timezone info"),
        ({"ignore_index": 1}, "ignore_index 1 is also the id of class 1"),
        (
            {"images": [{"image_id": "a.png", "height": 4, "width": 6, "pixels": [[1, 2], [1, 2]]}]},
            r"images.0: pixels[1] = [1, 2] is a duplicate pixel",
        ),
        (
            {"images": [{"image_id": "a.png", "height": 4, "width": 6, "pixels": [[0, 6]]}]},
            r"images.0: pixels[0] = [0, 6] is out of bounds of the 4x6 image",
        ),
        (
            {"images": [{"image_id": "a.png", "height": 4, "width": 6, "pixels": [[0, "1"]]}]},
            "images.0.pixels.0.1: Input should be a valid integer",
        ),
        (
            {"images": [{"image_id": "../../etc/passwd", "height": 4, "width": 6, "pixels": [[0, 0]]}]},
            "images.0.image_id: image id '../../etc/passwd' must be a relative POSIX path",
        ),
        (
            {"images": [{"image_id": "/etc/passwd", "height": 4, "width": 6, "pixels": [[0, 0]]}]},
            "must be a relative POSIX path",
        ),
        (
            {"images": [{"image_id": "a.png", "height": 4, "width": 6, "pixels": [[0, 0]]}] * 2},
            "images[1] has the duplicate image_id 'a.png' (also images[0])",
        ),
        (
            {"classes": [{"id": 0, **CLASSES[0]}, {"id": 1, **CLASSES[1], "key": "K"}]},
            "classes[1] has the duplicate key 'k' (also classes[0])",
        ),
        ({"classes": [{"id": 1, **CLASSES[0]}]}, "classes[0].id is 1; class ids must be 0, 1, 2, ... in order"),
        ({"classes": [{"id": 0, **CLASSES[0], "key": "ab"}]}, "classes.0.key: key must be a single printable"),
        ({"images": []}, "images: Tuple should have at least 1 item"),
    ],
)
def test_load_job_names_the_bad_field(tmp_path, change, message):
    path = write_document(tmp_path / "job.json", job_document(**change))
    with pytest.raises(AnnotationJobError) as raised:
        load_job(path)
    assert message in str(raised.value)
    assert str(path) in str(raised.value)


def test_load_job_rejects_files_that_are_not_json(tmp_path):
    path = tmp_path / "job.json"
    path.write_text("{not json")
    with pytest.raises(AnnotationJobError, match="is not valid JSON"):
        load_job(path)
    with pytest.raises(AnnotationJobError, match="cannot read job file"):
        load_job(tmp_path / "missing.json")


def test_split_job_balances_pixels_by_image(tmp_path):
    sizes = {"a": 5, "b": 1, "c": 3, "d": 4, "e": 3}  # image -> pixel count
    images = [
        {"image_id": f"{name}.png", "height": 1, "width": 8, "pixels": [[0, x] for x in range(count)]}
        for name, count in sizes.items()
    ]
    job = load_job(write_document(tmp_path / "job.json", job_document(images=images)))

    first, second = split_job(job, 2)

    # Greedy by size: a(5)->1, d(4)->2, c(3)->2 (4<5), e(3)->1 (5<7), b(1)->1 or 2: 8 vs 7 -> 2.
    assert [image.image_id for image in first.images] == ["a.png", "e.png"]
    assert [image.image_id for image in second.images] == ["b.png", "c.png", "d.png"]
    assert (first.num_pixels, second.num_pixels) == (8, 8)
    assert (first.job_id, second.job_id) == ("demo-r01-1of2", "demo-r01-2of2")
    assert first.classes == job.classes and first.round == job.round
    assert [len(batch.images) for batch in split_job(job, 5)] == [1] * 5
    with pytest.raises(AnnotationJobError, match="into 6 batches"):
        split_job(job, 6)


# --- key bindings -------------------------------------------------------------------------------------------------


def test_key_bindings_come_from_the_classes_and_can_be_remapped(tmp_path):
    classes = load_job(write_document(tmp_path / "job.json", job_document())).classes
    assert resolve_key_bindings(classes) == ["k", "r", "c"]
    assert resolve_key_bindings(classes, {"sky": "r", "road": "k"}) == ["r", "k", "c"]  # a swap is fine
    assert parse_key_overrides("sky=q, road=1") == {"sky": "q", "road": "1"}
    key_file = tmp_path / "keys.yaml"
    key_file.write_text("sky: q\ncar: '7'\n")
    assert parse_key_overrides(str(key_file)) == {"sky": "q", "car": "7"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sky": "R"}, "key 'r' of class 'road' collides with class 'sky'"),  # case-insensitive
        ({"car": "-"}, "key '-' of class 'car' collides with the navigation key '-' (zoom out)"),
        ({"car": "+"}, "collides with the navigation key '+' (zoom in)"),
        ({"skyy": "q"}, "unknown classes ['skyy']; the classes are ['sky', 'road', 'car']"),
        ({"sky": "qq"}, "key 'qq' of class 'sky' must be a single printable"),
    ],
)
def test_key_binding_collisions_are_rejected_naming_both(tmp_path, overrides, message):
    classes = load_job(write_document(tmp_path / "job.json", job_document())).classes
    with pytest.raises(KeyBindingError) as raised:
        resolve_key_bindings(classes, overrides)
    assert message in str(raised.value)


def test_key_override_syntax_errors():
    with pytest.raises(KeyBindingError, match="must look like class=key"):
        parse_key_overrides("sky:q")


# --- the progress store -------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def job(tmp_path):
    return load_job(write_document(tmp_path / "job.json", job_document()))


def submission(annotator: str, pixel: tuple[str, int, int], class_id: int = 0, sid: str | None = None) -> Submission:
    image_id, y, x = pixel
    return Submission(annotator, image_id, y, x, class_id, 0.75, sid or f"{annotator}-{image_id}-{y}-{x}-{class_id}")


A0, A1, A2, B0, B1 = ("images/a.png", 0, 0), ("images/a.png", 1, 2), ("images/a.png", 3, 5), ("images/b.png", 2, 2), (
    "images/b.png", 0, 1)


def test_claims_are_exclusive_until_the_lease_lapses(tmp_path, job):
    clock = FakeClock()
    store = ProgressStore(tmp_path / "p.sqlite", job, lease_seconds=600, clock=clock)

    ana = store.claim("ana", 2)
    ben = store.claim("ben", 2)
    assert ana == [PixelRef(*A0), PixelRef(*A1)]
    assert ben == [PixelRef(*B0), PixelRef(*B1)]  # image b: nobody else is working there
    assert store.claim("ana", 2) == ana  # the same claims, renewed
    assert store.claim("cy", 5) == [PixelRef(*A2)]  # the only free pixel left

    clock.now += 601  # ben went for lunch; ana and cy did not act either
    assert store.claim("dan", 5) == [PixelRef(*A0), PixelRef(*A1), PixelRef(*A2), PixelRef(*B0), PixelRef(*B1)]
    with pytest.raises(PixelConflictError, match="assigned to annotator 'dan'"):
        store.record(submission("ben", B0))


def test_record_validates_and_is_idempotent_per_submission(tmp_path, job):
    store = ProgressStore(tmp_path / "p.sqlite", job)
    assert store.record(submission("ana", A0, sid="s1")) is True
    assert store.record(submission("ana", A0, sid="s1")) is False  # a retried request
    with pytest.raises(PixelConflictError, match="already labelled by 'ana'"):
        store.record(submission("ana", A0, class_id=1, sid="s2"))
    with pytest.raises(PixelConflictError, match="already labelled by 'ana'"):
        store.record(submission("ben", A0, sid="s3"))
    with pytest.raises(SubmissionRejectedError, match="was not queried in job 'demo-r01'"):
        store.record(submission("ana", ("images/a.png", 2, 2)))
    with pytest.raises(SubmissionRejectedError, match=r"out of bounds of image 'images/a.png' \(4x6\)"):
        store.record(submission("ana", ("images/a.png", 4, 0)))
    with pytest.raises(SubmissionRejectedError, match="class 3 does not exist: classes are 0..2, or 255 for unsure"):
        store.record(submission("ana", A1, class_id=3))
    with pytest.raises(SubmissionRejectedError, match="annotator name"):
        store.record(submission("ana ben", A1))
    assert store.done_count() == 1


def test_undo_gives_the_last_label_back_and_relabel_keeps_its_place(tmp_path, job):
    store = ProgressStore(tmp_path / "p.sqlite", job)
    store.record(submission("ana", A0))
    store.record(submission("ana", A1))
    store.relabel(submission("ana", A0, class_id=2))  # reviewing an older label does not make it the last one
    with pytest.raises(PixelConflictError, match="only they can change it"):
        store.relabel(submission("ben", A0, class_id=1))

    assert store.undo("ana") == PixelRef(*A1)
    assert store.claim("ben", 5)[0] != PixelRef(*A1)  # the pixel went back to ana, not to the pool
    assert store.claim("ana", 1)[0] == PixelRef(*A1)
    assert store.undo("ana", expected=PixelRef(*A1)) == PixelRef(*A1)  # retried request: already undone
    with pytest.raises(PixelConflictError, match="your last label is image 'images/a.png' y=0 x=0"):
        store.undo("ana", expected=PixelRef(*A2))
    assert store.undo("ana") == PixelRef(*A0)
    with pytest.raises(PixelConflictError, match="has no label to undo"):
        store.undo("ana")
    assert store.done_count() == 0


def test_skipped_images_come_back_last(tmp_path, job):
    store = ProgressStore(tmp_path / "p.sqlite", job)
    assert store.claim("ana", 2) == [PixelRef(*A0), PixelRef(*A1)]
    assert store.skip_image("ana", "images/a.png") == 2
    assert store.claim("ana", 5) == [PixelRef(*B0), PixelRef(*B1), PixelRef(*A0), PixelRef(*A1), PixelRef(*A2)]


def test_completed_labels_export_and_ingest(tmp_path, job):
    store = ProgressStore(tmp_path / "p.sqlite", job)
    store.record(submission("ana", B1, class_id=1))
    store.record(submission("ben", A0, class_id=IGNORE))  # unsure
    assert not store.is_complete()
    with pytest.raises(AnnotationJobError, match="3 of 5 pixels have no label"):
        ingest_job_labels(tmp_path / "job.json", tmp_path / "p.sqlite", tmp_path / "batch.parquet")

    for pixel in (A1, A2, B0):
        store.record(submission("ana", pixel, class_id=2))
    assert store.is_complete()
    path = ingest_job_labels(tmp_path / "job.json", tmp_path / "p.sqlite", tmp_path / "batch.parquet")

    labels = read_labels(path)
    assert list(labels.columns) == LABEL_COLUMNS
    assert list(zip(labels.image_id, labels.y, labels.x, labels.class_id, labels.annotator, strict=True)) == [
        ("images/a.png", 0, 0, IGNORE, "ben"),  # job order, not labelling order
        ("images/a.png", 1, 2, 2, "ana"),
        ("images/a.png", 3, 5, 2, "ana"),
        ("images/b.png", 2, 2, 2, "ana"),
        ("images/b.png", 0, 1, 1, "ana"),
    ]
    assert set(labels["source"]) == {"human"} and set(labels["round"]) == {1}
    assert np.allclose(labels["seconds"], 0.75)
    assert str(labels["time"].dt.tz) == "UTC"


def test_a_progress_database_belongs_to_one_job(tmp_path, job):
    ProgressStore(tmp_path / "p.sqlite", job)
    other = load_job(write_document(tmp_path / "other.json", job_document(job_id="other")))
    with pytest.raises(AnnotationJobError, match="belongs to job 'demo-r01'"):
        ProgressStore(tmp_path / "p.sqlite", other)
    with pytest.raises(AnnotationJobError, match="does not exist"):
        ingest_job_labels(tmp_path / "job.json", tmp_path / "none.sqlite", tmp_path / "out.parquet")


def test_claims_stop_at_the_cap_of_pixels_held(tmp_path, job):
    store = ProgressStore(tmp_path / "p.sqlite", job)
    assert store.claim("ana", 5, max_held=2) == [PixelRef(*A0), PixelRef(*A1)]
    assert store.claim("ana", 5, max_held=2) == [PixelRef(*A0), PixelRef(*A1)]
    store.record(submission("ana", A0))
    assert store.claim("ana", 5, max_held=2) == [PixelRef(*A1), PixelRef(*A2)]
    assert len(store.claim("ben", 5)) == 2  # without a cap: everything left


# --- progress databases that cannot be used ------------------------------------------------------------------------


def not_a_progress_database(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE notes (text TEXT)")
    connection.commit()
    connection.close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: path.write_bytes(b""), r"is empty \(0 bytes\)"),
        (lambda path: path.write_bytes(b"PK\x03\x04 not a database at all " * 200), "is corrupt or not an SQLite"),
        (not_a_progress_database, "is not a PixelPick progress database"),
    ],
)
def test_an_unusable_progress_database_is_refused_in_one_line_and_left_alone(tmp_path, job, make, message):
    path = tmp_path / "p.sqlite"
    make(path)
    before = path.read_bytes()
    with pytest.raises(ProgressDatabaseError, match=message) as caught:
        ProgressStore(path, job)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert path.read_bytes() == before  # never rebuilt over what is there

    out = tmp_path / "batch.parquet"
    with pytest.raises(ProgressDatabaseError, match=message):
        ingest_job_labels(tmp_path / "job.json", path, out)
    assert not out.exists()
    assert path.read_bytes() == before


def test_a_database_deleted_while_in_use_is_not_recreated(tmp_path, job):
    store = ProgressStore(tmp_path / "p.sqlite", job)
    store.path.unlink()
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        store.record(submission("ana", A0))
    assert not store.path.exists()


def test_a_new_database_appears_whole_and_leaves_no_temporary_files(tmp_path, job):
    folder = tmp_path / "progress"
    stores = []
    threads = [threading.Thread(target=lambda: stores.append(ProgressStore(folder / "p.sqlite", job)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stores) == 4  # every racing opener got the one database
    stores[0].record(submission("ana", A0))
    assert [store.done_count() for store in stores] == [1, 1, 1, 1]
    assert [path.name for path in folder.iterdir() if path.name.endswith(".tmp")] == []


def test_ingesting_a_job_without_labels_or_unfinished_writes_nothing(tmp_path, job):
    store = ProgressStore(tmp_path / "p.sqlite", job)
    out = tmp_path / "batch.parquet"
    for allow_incomplete in (False, True):
        with pytest.raises(AnnotationJobError, match="job 'demo-r01' has no labels yet") as caught:
            ingest_job_labels(tmp_path / "job.json", store.path, out, allow_incomplete=allow_incomplete)
        assert "\n" not in str(caught.value)
    store.record(submission("ana", A0))
    with pytest.raises(AnnotationJobError, match="4 of 5 pixels have no label"):
        ingest_job_labels(tmp_path / "job.json", store.path, out)
    assert not out.exists()
    assert len(read_labels(ingest_job_labels(tmp_path / "job.json", store.path, out, allow_incomplete=True))) == 1


# --- closing a job -------------------------------------------------------------------------------------------------


def test_a_closed_job_refuses_every_change(tmp_path, job):
    store = ProgressStore(tmp_path / "p.sqlite", job)
    store.record(submission("ana", A0, sid="kept"))
    store.claim("ben", 1)
    assert store.closed_info() is None

    closed = store.close("ingested into round 1")
    assert closed.note == "ingested into round 1"
    assert closed.closed_at.tzinfo is not None
    assert abs((datetime.now(UTC) - closed.closed_at).total_seconds()) < 60
    assert store.closed_info() == closed
    assert ProgressStore(store.path, job).closed_info() == closed  # it is stored, not remembered
    assert store.close("again") == closed  # the first close stands

    refused = [
        lambda: store.record(submission("ana", A1)),
        lambda: store.relabel(submission("ana", A0, class_id=2)),
        lambda: store.undo("ana"),
        lambda: store.claim("cy", 2),
        lambda: store.skip_image("ben", "images/a.png"),
    ]
    for change in refused:
        with pytest.raises(JobClosedError, match="job 'demo-r01' was ingested and is closed since") as caught:
            change()
        assert caught.value.note == "ingested into round 1" and caught.value.closed_at == closed.closed_at
    assert store.record(submission("ana", A0, sid="kept")) is False  # a retry of a label stored before
    labels = store.completed_labels()
    assert labels[["y", "x", "class_id"]].values.tolist() == [[0, 0, 0]]
    path = ingest_job_labels(tmp_path / "job.json", store.path, tmp_path / "b.parquet", allow_incomplete=True)
    assert len(read_labels(path)) == 1  # a closed job can be ingested again


@pytest.mark.parametrize("note", ["", "   ", None])
def test_closing_needs_a_reason(tmp_path, job, note):
    store = ProgressStore(tmp_path / "p.sqlite", job)
    with pytest.raises(AnnotationJobError, match="closing job 'demo-r01' needs a note"):
        store.close(note)
    assert store.closed_info() is None
