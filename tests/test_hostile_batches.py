"""Hostile label batches through the real ingest path: every malformed batch is refused whole, in one line naming
the column and the first bad row, before anything is written or versioned."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixelpick import human
from pixelpick.annotation.jobs import load_job
from pixelpick.annotation.progress import ProgressStore, Submission, default_progress_path
from pixelpick.campaign import open_campaign
from pixelpick.errors import LabelFileError, LabelValidationError, PixelPickError
from pixelpick.recipe import STEPS, run_step
from tests.conftest import TINY_PARAMS


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A campaign whose round 0 is queried and annotated, never ingested: its annotations are the valid batch."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "params.yaml").write_text(TINY_PARAMS)
    campaign = open_campaign(folder / "params.yaml")
    run_step(campaign, STEPS["query"], 0)
    run_step(campaign, STEPS["annotate"], 0)
    return campaign, pq.read_table(campaign.files(0).annotations)


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def _one(table: pa.Table, name: str, row: int, value: object, kind: pa.DataType | None = None) -> pa.Table:
    values = table[name].to_pylist()
    values[row] = value
    return _set(table, name, pa.array(values, kind or table[name].type))


def _not_queried(campaign, table: pa.Table, row: int) -> pa.Table:
    """Row `row` moved to a pixel of its image that the round never queried."""
    image_id = table["image_id"][row].as_py()
    asked = {(y, x) for i, y, x in zip(*(table[c].to_pylist() for c in ("image_id", "y", "x")), strict=True)
             if i == image_id}
    height, width = campaign.image_sizes[image_id]
    y, x = next((y, x) for y in range(height) for x in range(width) if (y, x) not in asked)
    return _one(_one(table, "y", row, y), "x", row, x)


# Each malformed batch: (what is changed, the column its refusal must name, whether the whole column is wrong).
MALFORMED = {
    "y as numeric strings": (lambda c, t, r: _set(t, "y", pa.array([str(v) for v in t["y"].to_pylist()])), "y", True),
    "class_id as booleans": (lambda c, t, r: _set(t, "class_id", pa.array([v > 0 for v in t["class_id"].to_pylist()])),
                             "class_id", True),
    "class 2.5": (lambda c, t, r: _one(t, "class_id", r, 2.5, pa.float64()), "class_id", False),
    "class ids as floats": (lambda c, t, r: _set(t, "class_id", t["class_id"].cast(pa.float64())), "class_id", True),
    "class 200": (lambda c, t, r: _one(t, "class_id", r, 200), "class_id", False),
    "class -1": (lambda c, t, r: _one(t, "class_id", r, -1), "class_id", False),
    "another round's row": (lambda c, t, r: _one(t, "round", r, 1), "round", False),
    "a pixel never queried": (lambda c, t, r: _not_queried(c, t, r), "y", False),
    "a pixel outside the image": (lambda c, t, r: _one(t, "y", r, 10_000), "y", False),
    "an unknown image": (lambda c, t, r: _one(t, "image_id", r, "train/none.png"), "image_id", False),
    "a missing class": (lambda c, t, r: _one(t, "class_id", r, None), "class_id", False),
    "negative seconds": (lambda c, t, r: _one(t, "seconds", r, -1.0), "seconds", False),
    "times as text": (lambda c, t, r: _set(t, "time", pa.array(["yesterday"] * len(t))), "time", True),
    "round as text": (lambda c, t, r: _set(t, "round", pa.array(["0"] * len(t))), "round", True),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(MALFORMED)), position=st.floats(0, 1, exclude_max=True))
def test_a_malformed_batch_is_refused_in_one_line_naming_column_and_row(simulated, kind, position):
    campaign, valid = simulated
    change, column, whole_column = MALFORMED[kind]
    row = int(position * len(valid))
    batch = campaign.files(0).annotations
    pq.write_table(change(campaign, valid, row), batch)
    try:
        with pytest.raises((LabelFileError, LabelValidationError)) as refused:
            run_step(campaign, STEPS["ingest"], 0)
    finally:
        pq.write_table(valid, batch)
    message = str(refused.value)
    assert "\n" not in message and len(message) < 400
    assert column in message, message
    assert f"row {0 if whole_column else row}" in message, message
    assert not campaign.files(0).snapshot.exists()
    assert not campaign.files(0).step_record("ingest").exists()


def test_the_valid_batch_is_ingested_whole(simulated, tmp_path):
    campaign, valid = simulated
    out = tmp_path / "snapshot.parquet"
    from dataclasses import replace

    from pixelpick.labelling import ingest

    ingest(replace(STEPS["ingest"].prepare(campaign, 0), outputs={"snapshot": out}))
    assert pq.read_table(out).num_rows == valid.num_rows


# --- the progress database ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def human_campaign(tmp_path_factory):
    """A human campaign in a git + DVC repository whose round 0 job is labelled in full, not yet collected."""
    repo = tmp_path_factory.mktemp("people")
    (repo / "params.yaml").write_text(TINY_PARAMS)
    (repo / ".gitignore").write_text("/data/synthetic/\n/data/cache/\n")
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    campaign = open_campaign(repo / "params.yaml", {"campaign.annotator": "human", "campaign.name": "people"})
    run_step(campaign, STEPS["query"], 0)
    job_path = human.export_job(campaign, 0)
    job = load_job(job_path)
    store = ProgressStore(default_progress_path(job_path), job)
    pixels = [(image.image_id, y, x) for image in job.images for y, x in image.pixels]
    for n, (image_id, y, x) in enumerate(pixels):
        truth = int(campaign.pool.load_mask(image_id)[y, x])
        store.record(Submission("ana", image_id, y, x, truth, 0.5, f"s{n}"))
    return campaign, default_progress_path(job_path)


@pytest.mark.parametrize(("column", "value", "stored_as"), [
    ("class_id", 2.5, "float"),
    ("class_id", "sky", "str"),
    ("class_id", 200, "not a class"),
    ("seconds", "abc", "number of seconds"),
    ("time", "yesterday", "ISO 8601"),
])
def test_a_damaged_progress_database_is_refused_in_one_line_before_a_batch_is_written(
        human_campaign, column, value, stored_as):
    campaign, database = human_campaign
    original = database.read_bytes()
    with sqlite3.connect(database) as db:
        db.execute(f"UPDATE labels SET {column} = ? WHERE seq = (SELECT MAX(seq) FROM labels)", (value,))
    try:
        with pytest.raises(PixelPickError) as refused:
            human.collect_labels(campaign, 0)
    finally:
        with sqlite3.connect(database) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        database.write_bytes(original)
    message = str(refused.value)
    assert "\n" not in message and f"labels.{column}" in message and stored_as in message, message
    assert not campaign.layout.batch(0).exists()


def test_a_collected_batch_replaced_by_a_bad_one_is_refused_before_dvc_records_it(human_campaign):
    from tasks.human import collect_labels

    campaign, _ = human_campaign
    collect_labels.fn(str(campaign.layout.dir), 0)
    human.close_job(campaign, 0)
    report = __import__("json").loads(campaign.files(0).labelling.read_text())  # round 0: nothing was suggested
    assert report["labels"] == human.job_progress(campaign, 0).total and report["acceptance_rate"] is None
    batch = campaign.layout.batch(0)
    record = batch.with_name(batch.name + ".dvc")
    recorded = record.read_bytes()
    table = pq.read_table(batch)
    pq.write_table(_one(table, "class_id", 3, 200), batch)

    with pytest.raises(LabelValidationError, match=r"row 3 .*class_id=200"):
        collect_labels.fn(str(campaign.layout.dir), 0)
    assert record.read_bytes() == recorded  # DVC still records the batch that was collected
    pq.write_table(table, batch)
    assert collect_labels.fn(str(campaign.layout.dir), 0) == __import__("yaml").safe_load(recorded)["outs"][0]["md5"]
    assert np.array_equal(pq.read_table(batch)["class_id"], table["class_id"])
