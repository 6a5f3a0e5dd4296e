"""Properties of LabelStore.append over generated batches: re-appending is a no-op, a conflicting batch is refused
whole, and the order in which compatible batches arrive does not change the stored table."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixelpick.errors import LabelValidationError
from pixelpick.labels import LABEL_COLUMNS, LabelStore

SIZES = {"train/a.png": (3, 4), "train/b.png": (2, 2), "val/c.png": (4, 1)}
NUM_CLASSES = 3
VOID = 255
PIXELS = [(image_id, y, x) for image_id, (height, width) in SIZES.items() for y in range(height) for x in range(width)]
CLASSES = st.sampled_from([*range(NUM_CLASSES), VOID])
PROPERTIES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def labellings(draw, min_size: int = 1) -> dict[tuple[str, int, int], dict]:
    """A consistent set of labels: some pixels, each with one full row (class, round, annotator, ...)."""
    pixels = draw(st.lists(st.sampled_from(PIXELS), min_size=min_size, unique=True))
    return {
        pixel: {
            "image_id": pixel[0], "y": pixel[1], "x": pixel[2], "class_id": draw(CLASSES),
            "round": draw(st.integers(0, 5)), "source": draw(st.sampled_from(["human", "simulated"])),
            "annotator": draw(st.sampled_from(["ana", "ben"])), "seconds": draw(st.floats(0, 30, width=32)),
            "time": pd.Timestamp("2024-05-01", tz="UTC") + pd.Timedelta(seconds=draw(st.integers(0, 10**6))),
        }
        for pixel in pixels
    }


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=LABEL_COLUMNS)


def new_store(folder: str) -> LabelStore:
    return LabelStore(Path(folder) / "labels.parquet", image_sizes=SIZES, num_classes=NUM_CLASSES, ignore_index=VOID)


def sorted_table(store: LabelStore) -> pd.DataFrame:
    return store.read().sort_values(["image_id", "y", "x"]).reset_index(drop=True)


@PROPERTIES
@given(labels=labellings(), data=st.data())
def test_appending_a_batch_again_changes_nothing(labels, data):
    rows = list(labels.values())
    repeated = data.draw(st.lists(st.sampled_from(rows), max_size=5))  # a batch may repeat its own rows
    batch = frame(data.draw(st.permutations(rows + repeated)))
    with tempfile.TemporaryDirectory() as folder:
        store = new_store(folder)
        first = store.append(batch)
        assert (first.added, first.duplicates) == (len(rows), len(repeated))
        before = store.path.read_bytes()
        again = store.append(batch)
        assert (again.added, again.duplicates) == (0, len(batch))
        assert store.path.read_bytes() == before


@PROPERTIES
@given(stored=labellings(), extra=labellings(min_size=0), data=st.data())
def test_a_batch_with_a_conflicting_label_is_refused_whole(stored, extra, data):
    pixel = data.draw(st.sampled_from(sorted(stored)))
    other_class = data.draw(CLASSES.filter(lambda class_id: class_id != stored[pixel]["class_id"]))
    conflicting = {**stored[pixel], "class_id": other_class}
    compatible = [row for key, row in extra.items() if key not in stored]  # would be accepted on their own
    batch = frame(data.draw(st.permutations([*compatible, conflicting])))
    with tempfile.TemporaryDirectory() as folder:
        store = new_store(folder)
        store.append(frame(list(stored.values())))
        before = store.path.read_bytes()
        with pytest.raises(LabelValidationError, match="already labelled class"):
            store.append(batch)
        assert store.path.read_bytes() == before


@PROPERTIES
@given(labels=labellings(), data=st.data())
def test_a_batch_giving_one_pixel_two_classes_is_refused_whole(labels, data):
    row = data.draw(st.sampled_from(list(labels.values())))
    twin = {**row, "class_id": data.draw(CLASSES.filter(lambda class_id: class_id != row["class_id"]))}
    batch = frame(data.draw(st.permutations([*labels.values(), twin])))
    with tempfile.TemporaryDirectory() as folder:
        store = new_store(folder)
        with pytest.raises(LabelValidationError, match="more than one class"):
            store.append(batch)
        assert not store.path.exists()


@PROPERTIES
@given(labels=labellings(), data=st.data())
def test_the_order_of_compatible_batches_does_not_change_the_table(labels, data):
    rows = list(labels.values())
    # Overlapping batches drawn from one consistent labelling: each pixel always comes with the same row.
    batches = [frame(data.draw(st.lists(st.sampled_from(rows), min_size=1, max_size=len(rows) + 2)))
               for _ in range(data.draw(st.integers(1, 4)))]
    batches.append(frame(rows))  # so that every pixel is labelled in the end
    order = data.draw(st.permutations(range(len(batches))))
    with tempfile.TemporaryDirectory() as first_folder, tempfile.TemporaryDirectory() as second_folder:
        in_order, shuffled = new_store(first_folder), new_store(second_folder)
        added = [in_order.append(batch).added for batch in batches]
        added_shuffled = [shuffled.append(batches[index]).added for index in order]
        assert sum(added) == sum(added_shuffled) == len(rows)
        pd.testing.assert_frame_equal(sorted_table(in_order), sorted_table(shuffled))
        assert len(in_order.read()) == len(rows)
