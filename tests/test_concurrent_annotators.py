"""Several annotators label one job at once, each with their own client, against one app and one progress database:
every queried pixel ends up labelled exactly once, and the exported batch is a valid label-store batch."""

from __future__ import annotations

import threading
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pixelpick.annotation import ProgressStore, export_job, ingest_job_labels, load_job
from pixelpick.annotation.server import create_app
from pixelpick.datasets.folder import FolderDataset
from pixelpick.labels import AppendResult, LabelStore

with warnings.catch_warnings():  # starlette asks for httpx2 in its TestClient; httpx is what is installed
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

IGNORE = 255
CLASSES = [{"name": name, "colour": [i * 60, 0, 0], "key": key} for i, (name, key) in enumerate(
    [("sky", "k"), ("road", "r"), ("car", "c")])]
SIZE = (12, 16)
ANNOTATORS = ["ana", "ben", "cy", "dan"]


def truth(y: int, x: int) -> int:
    return (y + x) % len(CLASSES)


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    root.joinpath("classes.yaml").write_text(yaml.safe_dump({"ignore_index": IGNORE, "classes": CLASSES}))
    rng = np.random.default_rng(0)
    rows = []
    for index in range(8):
        image_id = f"images/im{index}.png"
        Image.fromarray(np.full((*SIZE, 3), 50 + index, np.uint8)).save(root / image_id)
        flat = rng.choice(SIZE[0] * SIZE[1], 9, replace=False)
        rows += [(image_id, int(i // SIZE[1]), int(i % SIZE[1])) for i in flat]
    queries = pd.DataFrame(rows, columns=["image_id", "y", "x"])
    job_path = export_job(queries, FolderDataset(root, "train"), job_id="crowd", campaign="demo", round_id=2,
                          path=tmp_path / "job.json")
    job = load_job(job_path)
    store = ProgressStore(tmp_path / "job.progress.sqlite", job)
    # No rate limit: these annotators are scripts that press keys as fast as the server answers.
    app = create_app(job, store, root, max_held=5, rate_limit=None)
    return {"app": app, "store": store, "job": job, "job_path": job_path, "tmp": tmp_path}


def annotate(app, name: str, results: dict, errors: list, start: threading.Barrier) -> None:
    """Claim a few pixels at a time and label them, like the page does, until nothing is left to claim."""
    labelled, refused = [], []
    try:
        with TestClient(app, base_url="http://localhost") as client:
            start.wait()
            while True:
                answer = client.post("/api/claims", json={"annotator": name, "count": 3})
                assert answer.status_code == 200, answer.text
                pixels = answer.json()["pixels"]
                if not pixels:
                    break
                for n, pixel in enumerate(pixels):
                    body = {"annotator": name, **pixel, "class_id": truth(pixel["y"], pixel["x"]), "seconds": 0.5,
                            "submission_id": f"{name}-{pixel['image_id']}-{pixel['y']}-{pixel['x']}"}
                    stored = client.post("/api/labels", json=body)
                    assert stored.status_code == 201, stored.text
                    assert stored.json()["stored"] is True
                    if n == 0:  # a retried request (lost answer) is acknowledged, not stored again
                        again = client.post("/api/labels", json=body)
                        assert again.status_code == 201 and again.json()["stored"] is False
                    labelled.append((pixel["image_id"], pixel["y"], pixel["x"]))
                # Another name cannot label over it.
                other = client.post("/api/labels", json={**body, "annotator": "intruder", "submission_id": name})
                refused.append(other.status_code)
    except BaseException as error:  # reported by the test, not lost in the thread
        errors.append(error)
    results[name] = (labelled, refused)


def test_annotators_label_a_whole_job_at_once_without_loss_or_doubles(served):
    job, store = served["job"], served["store"]
    results: dict[str, tuple[list, list]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(ANNOTATORS))
    threads = [threading.Thread(target=annotate, args=(served["app"], name, results, errors, start))
               for name in ANNOTATORS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[0]
    assert not any(thread.is_alive() for thread in threads)

    queried = [(image.image_id, y, x) for image in job.images for y, x in image.pixels]
    by_annotator = {name: labelled for name, (labelled, _) in results.items()}
    counts = Counter(pixel for labelled in by_annotator.values() for pixel in labelled)
    assert sorted(counts) == sorted(queried) and set(counts.values()) == {1}  # each pixel once, by one annotator
    assert {status for _, refused in results.values() for status in refused} == {409}
    assert sum(len(labelled) > 0 for labelled in by_annotator.values()) >= 2  # the work was really shared

    labels = store.completed_labels()
    assert store.is_complete() and len(labels) == len(queried)
    stored_by = {(row.image_id, row.y, row.x): (row.annotator, row.class_id) for row in labels.itertuples()}
    assert stored_by == {pixel: (name, truth(pixel[1], pixel[2]))
                         for name, labelled in by_annotator.items() for pixel in labelled}

    batch = pd.read_parquet(ingest_job_labels(served["job_path"], store.path, served["tmp"] / "batch.parquet"))
    sizes = {image.image_id: SIZE for image in job.images}
    label_store = LabelStore(served["tmp"] / "labels.parquet", image_sizes=sizes, num_classes=len(CLASSES),
                             ignore_index=IGNORE)
    assert label_store.append(batch) == AppendResult(added=len(queried), duplicates=0)
    assert label_store.append(batch) == AppendResult(added=0, duplicates=len(queried))
    assert set(label_store.read()["round"]) == {2}
