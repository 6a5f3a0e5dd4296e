"""LabelStore: validation, all-or-nothing appends, idempotent re-ingest, atomic writes, snapshots, file checks."""

import os
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pixelpick.errors import LabelFileError, LabelValidationError, UnknownImageError
from pixelpick.io import remove_stale_temporaries
from pixelpick.labels import LABEL_COLUMNS, AppendResult, LabelStore, label_frame, read_labels

SIZES = {"train/a.png": (4, 5), "train/b.png": (3, 3)}
VOID = 255
NOW = pd.Timestamp("2024-05-01 12:00:00", tz="UTC")


def batch(*pixels, round_id=0, source="human") -> pd.DataFrame:
    """A label batch from (image_id, y, x, class_id) tuples."""
    return pd.DataFrame(
        [
            {"image_id": image_id, "y": y, "x": x, "class_id": class_id, "round": round_id, "source": source,
             "annotator": "ann", "seconds": 0.8, "time": NOW}
            for image_id, y, x, class_id in pixels
        ],
        columns=LABEL_COLUMNS,
    )


@pytest.fixture
def store(tmp_path) -> LabelStore:
    return LabelStore(tmp_path / "labels.parquet", image_sizes=SIZES, num_classes=3, ignore_index=VOID)


@pytest.fixture
def filled(store) -> LabelStore:
    store.append(batch(("train/a.png", 0, 0, 1), ("train/a.png", 3, 4, VOID), ("train/b.png", 2, 1, 0)))
    return store


def test_empty_store_reads_an_empty_typed_table(store):
    labels = store.read()
    assert list(labels.columns) == LABEL_COLUMNS and len(labels) == 0
    assert labels.dtypes.to_dict() == label_frame({name: [] for name in LABEL_COLUMNS}).dtypes.to_dict()
    assert str(labels["y"].dtype) == "int32" and str(labels["class_id"].dtype) == "int16"
    assert str(labels["time"].dtype) == "datetime64[us, UTC]"


def test_append_then_read_round_trips_in_append_order(filled):
    labels = filled.read()
    assert labels[["image_id", "y", "x", "class_id"]].values.tolist() == [
        ["train/a.png", 0, 0, 1],
        ["train/a.png", 3, 4, VOID],
        ["train/b.png", 2, 1, 0],
    ]
    assert (labels["time"] == NOW).all() and (labels["seconds"] == np.float32(0.8)).all()


def test_other_number_types_and_iso_times_are_accepted(store):
    raw = batch(("train/a.png", 1, 2, 0), ("train/a.png", 2, 2, 1))
    raw["y"] = raw["y"].astype(float)  # what pandas makes of an integer column that once held a NaN
    raw["x"] = raw["x"].astype(object)
    raw.loc[0, "x"] = np.int64(2)
    raw["time"] = "2024-05-01T12:00:00Z"
    assert store.append(raw) == AppendResult(added=2, duplicates=0)
    assert store.read()[["y", "x", "class_id"]].values.tolist() == [[1, 2, 0], [2, 2, 1]]
    assert (store.read()["time"] == NOW).all()


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("y", "1", "y='1' is text, not an integer"),
        ("x", "2", "x='2' is text, not an integer"),
        ("class_id", "0", "class_id='0' is text, not an integer"),
        ("round", "0", "round='0' is text, not an integer"),
        ("seconds", "0.8", "seconds='0.8' is text, not a number"),
        ("y", True, "y=True is bool, not an integer"),
        ("seconds", False, "seconds=False is bool, not a number"),
        ("class_id", pd.NA, "class_id=<NA> is missing, not an integer"),
    ],
)
def test_numbers_given_as_text_or_booleans_are_refused_naming_row_and_column(filled, name, value, reason):
    before = filled.path.read_bytes()
    rows = batch(("train/a.png", 1, 1, 0), ("train/a.png", 1, 2, 0))
    rows[name] = rows[name].astype(object)
    rows.loc[1, name] = value
    with pytest.raises(LabelValidationError) as caught:
        filled.append(rows)
    assert caught.value.row == 1
    assert caught.value.reason == reason
    assert "first bad row 1 (image_id='train/a.png'" in str(caught.value)
    assert filled.path.read_bytes() == before


def test_a_whole_column_of_text_numbers_is_refused(store):
    raw = batch(("train/a.png", 1, 2, 0))
    raw[["y", "x", "class_id"]] = raw[["y", "x", "class_id"]].astype(str)  # e.g. a CSV read without dtypes
    with pytest.raises(LabelValidationError, match="y='1' is text, not an integer"):
        store.append(raw)
    assert list(store.path.parent.iterdir()) == []


def test_exact_duplicates_are_skipped_so_reingest_is_idempotent(filled):
    before = filled.path.read_bytes()
    again = batch(("train/a.png", 0, 0, 1), ("train/a.png", 3, 4, VOID), ("train/b.png", 2, 1, 0), round_id=2)
    assert filled.append(again) == AppendResult(added=0, duplicates=3)
    assert filled.path.read_bytes() == before


def test_duplicates_within_a_batch_are_kept_once(store):
    result = store.append(batch(("train/a.png", 1, 1, 2), ("train/a.png", 1, 1, 2), ("train/a.png", 1, 2, 2)))
    assert result == AppendResult(added=2, duplicates=1)
    assert store.read()[["y", "x"]].values.tolist() == [[1, 1], [1, 2]]


def test_mixed_batch_adds_only_new_pixels(filled):
    result = filled.append(batch(("train/a.png", 0, 0, 1), ("train/a.png", 2, 2, 2)))
    assert result == AppendResult(added=1, duplicates=1)
    assert len(filled.read()) == 4


def bad_column(name, value):
    def make():
        rows = batch(("train/a.png", 1, 1, 0))
        rows[name] = rows[name].astype(object)
        rows.loc[0, name] = value
        return rows

    return make


@pytest.mark.parametrize(
    ("make_batch", "reason"),
    [
        (lambda: batch(("val/c.png", 0, 0, 1)), "unknown image id 'val/c.png'"),
        (lambda: batch(("train/a.png", 4, 0, 1)), r"y=4 is not an integer in \[0, 4\)"),
        (lambda: batch(("train/a.png", -1, 0, 1)), r"y=-1 is not an integer in \[0, 4\)"),
        (lambda: batch(("train/a.png", 0, 5, 1)), r"x=5 is not an integer in \[0, 5\)"),
        (lambda: batch(("train/b.png", 0, -2, 1)), r"x=-2 is not an integer in \[0, 3\)"),
        (lambda: batch(("train/a.png", 1, 1, 3)), r"class_id=3 is neither in \[0, 3\) nor the void index 255"),
        (lambda: batch(("train/a.png", 1, 1, -1)), "class_id=-1"),
        (lambda: batch(("train/a.png", 1, 1, 0), round_id=-1), "round=-1"),
        (lambda: batch(("train/a.png", 1, 1, 1), ("train/a.png", 1, 1, 2)), "more than one class"),
        (lambda: batch(("train/a.png", 0, 0, 2)), "already labelled class 1, not 2"),
        (bad_column("y", float("nan")), "y=nan"),
        (bad_column("y", 1.5), "y=1.5"),
        (bad_column("x", "left"), "x='left' is text, not an integer"),
        (bad_column("class_id", None), "class_id=None"),
        (bad_column("seconds", float("nan")), "seconds=nan"),
        (bad_column("seconds", -1.0), "seconds=-1.0"),
        (bad_column("time", "yesterday"), "time is missing"),
        (bad_column("annotator", ""), "annotator is missing"),
        (bad_column("image_id", None), "unknown image id None"),
    ],
)
def test_a_bad_row_rejects_the_batch_and_leaves_the_file_untouched(filled, make_batch, reason):
    before = filled.path.read_bytes()
    with pytest.raises(LabelValidationError, match=reason) as caught:
        filled.append(make_batch())
    assert caught.value.row == 0
    assert filled.path.read_bytes() == before


def test_rejection_names_the_first_bad_row_and_counts_all_of_them(filled):
    rows = batch(
        ("train/a.png", 1, 1, 0),
        ("train/a.png", 9, 1, 0),  # first bad row
        ("train/b.png", 1, 1, 0),
        ("train/b.png", 1, 1, 7),
        ("train/a.png", 0, 0, 2),  # conflicts with the store
    )
    rows.index = [10, 11, 12, 13, 14]
    with pytest.raises(LabelValidationError) as caught:
        filled.append(rows)
    error = caught.value
    assert (error.row, error.n_bad) == (11, 3)
    assert "3 of 5 rows are bad" in str(error)
    assert "first bad row 11 (image_id='train/a.png', y=9, x=1)" in str(error)
    assert len(filled.read()) == 3  # nothing from the batch was kept, not even its good rows


@pytest.mark.parametrize(("drop", "extra"), [("class_id", None), (None, "colour")])
def test_batch_with_wrong_columns_is_rejected(store, drop, extra):
    rows = batch(("train/a.png", 1, 1, 0))
    if drop:
        rows = rows.drop(columns=drop)
    if extra:
        rows[extra] = "red"
    with pytest.raises(LabelValidationError, match="columns"):
        store.append(rows)
    assert not store.path.exists()


@pytest.mark.parametrize(
    "make_empty",
    [
        lambda: batch(),
        lambda: pd.DataFrame(columns=LABEL_COLUMNS),  # object columns, as an empty query result gives
        lambda: pd.DataFrame({name: [] for name in LABEL_COLUMNS}),  # float64 columns
    ],
)
def test_empty_batch_adds_nothing_and_writes_nothing(filled, make_empty):
    before = filled.path.read_bytes()
    files = sorted(filled.path.parent.iterdir())
    assert filled.append(make_empty()) == AppendResult(added=0, duplicates=0)
    assert filled.path.read_bytes() == before
    assert sorted(filled.path.parent.iterdir()) == files


def test_empty_batch_on_a_new_store_creates_nothing(tmp_path):
    store = LabelStore(tmp_path / "new" / "labels.parquet", image_sizes=SIZES, num_classes=3, ignore_index=VOID)
    assert store.append(pd.DataFrame(columns=LABEL_COLUMNS)) == AppendResult(added=0, duplicates=0)
    assert not (tmp_path / "new").exists()


def test_a_batch_that_is_not_a_table_is_refused(store):
    with pytest.raises(LabelValidationError, match="expected a pandas DataFrame, got list"):
        store.append([("train/a.png", 1, 1, 0)])


def test_a_rejected_batch_leaves_no_new_file(tmp_path):
    store = LabelStore(tmp_path / "new" / "labels.parquet", image_sizes=SIZES, num_classes=3, ignore_index=VOID)
    with pytest.raises(LabelValidationError):
        store.append(batch(("train/a.png", 9, 9, 0)))
    assert not (tmp_path / "new").exists()  # not the store, its folder, its lock or a temporary file


def test_crash_during_write_keeps_the_old_file(filled, monkeypatch):
    before = filled.path.read_bytes()

    def crash(source, destination):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk vanished"):
        filled.append(batch(("train/a.png", 2, 2, 2)))
    assert filled.path.read_bytes() == before
    left = [p.name for p in filled.path.parent.iterdir() if not p.name.endswith(".lock")]
    assert left == ["labels.parquet"]  # no temp file left behind


def test_stale_temporary_files_of_a_crashed_write_are_removed_on_the_next_write(filled):
    folder = filled.path.parent
    stale = folder / ".labels.parquet.abcd1234.tmp"  # as io.atomic_write names them
    live = folder / ".labels.parquet.efgh5678.tmp"  # a writer still at work
    other = folder / ".other.parquet.abcd1234.tmp"  # another file's
    for path in (stale, live, other):
        path.write_bytes(b"half a parquet file")
    an_hour_ago = time.time() - 3600
    for path in (stale, other):
        os.utime(path, (an_hour_ago, an_hour_ago))

    filled.append(batch(("train/a.png", 2, 2, 2)))
    assert not stale.exists()
    assert live.exists() and other.exists()
    assert len(filled.read()) == 4


def test_remove_stale_temporaries_keeps_files_that_only_look_alike(tmp_path):
    target = tmp_path / "labels.parquet"
    names = [".labels.parquet.abcd1234.tmp", ".labels.parquet.abcd1234.tmp.keep", "labels.parquet.abcd1234.tmp",
             ".labels.parquet.toolongname.tmp", ".labels.parquet.lock"]
    an_hour_ago = time.time() - 3600
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (an_hour_ago, an_hour_ago))
    assert remove_stale_temporaries(target) == [tmp_path / names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    assert remove_stale_temporaries(tmp_path / "missing" / "labels.parquet") == []


def test_labelled_pixels_with_and_without_void(filled):
    assert filled.labelled_pixels("train/a.png").tolist() == [[0, 0], [3, 4]]
    assert filled.labelled_pixels("train/a.png", include_void=False).tolist() == [[0, 0]]
    empty = LabelStore(filled.path.with_name("none.parquet"), image_sizes=SIZES, num_classes=3, ignore_index=VOID)
    assert empty.labelled_pixels("train/b.png").shape == (0, 2)
    with pytest.raises(UnknownImageError, match="unknown image id 'train/zzz.png'"):
        filled.labelled_pixels("train/zzz.png")


def test_store_rejects_an_ignore_index_that_is_a_class(tmp_path):
    with pytest.raises(ValueError, match="ignore_index"):
        LabelStore(tmp_path / "l.parquet", image_sizes=SIZES, num_classes=3, ignore_index=2)


def test_corrupt_parquet_raises_label_file_error(tmp_path):
    path = tmp_path / "labels.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(LabelFileError, match="labels.parquet is not a readable Parquet file"):
        read_labels(path)
    store = LabelStore(path, image_sizes=SIZES, num_classes=3, ignore_index=VOID)
    with pytest.raises(LabelFileError):
        store.append(batch(("train/a.png", 1, 1, 0)))
    assert path.read_bytes() == b"PAR1 this is not parquet"


def test_missing_file_raises_label_file_error(tmp_path):
    with pytest.raises(LabelFileError, match="does not exist"):
        read_labels(tmp_path / "nothing.parquet")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda table: table.drop_columns(["round"]), "columns"),
        (lambda table: table.set_column(1, "y", pa.array(["top"] * len(table))), "label schema"),
        (lambda table: table.set_column(3, "class_id", pa.array([None] * len(table), pa.int16())), "missing values"),
    ],
)
def test_malformed_label_files_are_rejected(filled, tmp_path, change, message):
    path = tmp_path / "bad.parquet"
    pq.write_table(change(pq.read_table(filled.path)), path)
    with pytest.raises(LabelFileError, match=message) as caught:
        read_labels(path)
    assert "bad.parquet" in str(caught.value)


def test_a_store_labelling_a_pixel_twice_is_rejected(filled):
    table = pq.read_table(filled.path)
    pq.write_table(pa.concat_tables([table, table]), filled.path)
    assert len(read_labels(filled.path)) == 6  # a valid labels file...
    with pytest.raises(LabelFileError, match="labels 3 pixels more than once"):
        filled.read()  # ...but not a valid store


def test_label_frame_matches_the_stored_dtypes(filled):
    frame = label_frame({name: filled.read()[name].tolist() for name in LABEL_COLUMNS})
    assert frame.equals(filled.read())
