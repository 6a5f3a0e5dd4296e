"""The labelled-pixel store: one append-only, validated Parquet table shared by every round and annotator.

Each row says "annotator A gave pixel (y, x) of image I class c in round r". A `class_id` equal to the dataset's
`ignore_index` records "unsure/void": the pixel was asked and answered, so it is never asked again, and it is
never trained on. A batch is validated whole before anything is written, and every write replaces the file
atomically, so a crash or a bad batch never leaves a half-written table behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from pixelpick.errors import LabelFileError, LabelValidationError, UnknownImageError
from pixelpick.io import atomic_write

LABEL_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("y", pa.int32()),
        ("x", pa.int32()),
        ("class_id", pa.int16()),
        ("round", pa.int32()),
        ("source", pa.string()),  # how the label came about: "initial-random", "simulated", "human", ...
        ("annotator", pa.string()),
        ("seconds", pa.float32()),  # time the annotator took for this pixel
        ("time", pa.timestamp("us", tz="UTC")),
    ]
)
LABEL_COLUMNS: list[str] = list(LABEL_SCHEMA.names)
PIXEL_KEY = ["image_id", "y", "x"]
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class AppendResult:
    added: int  # new rows written
    duplicates: int  # rows skipped because the same pixel already had the same class


def label_frame(columns: Mapping[str, object]) -> pd.DataFrame:
    """A DataFrame in LABEL_COLUMNS order with the store's dtypes (what `LabelStore.read` returns).

    `columns` maps every label column to a sequence; scalars are not broadcast.
    """
    return pa.table({name: columns[name] for name in LABEL_COLUMNS}, schema=LABEL_SCHEMA).to_pandas()


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Read a labels Parquet file, checking it follows the label schema exactly.

    Raises `LabelFileError`, in one line naming the file, the column and its first bad row, when the file is
    missing, unreadable, has other columns, holds missing values, or holds a column of another kind than the
    schema's: text or booleans where integers belong, fractional numbers in an integer column. Arrow would cast
    "12", True and 2.5 to integers; a batch is refused instead. Values are not checked against a dataset: that is
    `LabelStore.append`'s job.
    """
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise LabelFileError(f"labels file {path} does not exist") from None
    except (pa.ArrowException, OSError) as exc:
        raise LabelFileError(f"labels file {path} is not a readable Parquet file: {_first_line(exc)}") from exc
    if sorted(table.column_names) != sorted(LABEL_COLUMNS):
        raise LabelFileError(f"labels file {path} has columns {table.column_names}, expected {LABEL_COLUMNS}")
    table = table.select(LABEL_COLUMNS)
    for name in LABEL_COLUMNS:
        column = table[name]
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise LabelFileError(f"labels file {path} has missing values in column {name!r}, first in row {row}")
        problem = _column_problem(name, column)
        if problem:
            raise LabelFileError(f"labels file {path} does not follow the label schema: column {name!r} {problem}")
    try:
        return table.cast(LABEL_SCHEMA).to_pandas()
    except (pa.ArrowException, ValueError) as exc:
        raise LabelFileError(f"labels file {path} does not follow the label schema: {_first_line(exc)}") from exc


def check_batch_for_round(labels: pd.DataFrame, *, round_id: int, queried: pd.DataFrame, source: object) -> None:
    """Refuse, in one line naming the column and the first bad row, a batch that is not round `round_id`'s
    answers: a `round` other than the round's, or a pixel the round never queried (`queried`: image_id, y, x)."""
    rounds = labels["round"].to_numpy()
    wrong = np.flatnonzero(rounds != round_id)
    if len(wrong):
        row = int(wrong[0])
        raise LabelValidationError(
            f"rejected label batch {source}: column 'round' is {rounds[row]} in row {row}, not this round's "
            f"{round_id} ({len(wrong)} of {len(labels)} rows)", row=row, reason="round", n_bad=len(wrong))
    asked = pd.MultiIndex.from_frame(queried[PIXEL_KEY].astype({"y": np.int64, "x": np.int64}))
    given = pd.MultiIndex.from_frame(labels[PIXEL_KEY].astype({"y": np.int64, "x": np.int64}))
    stray = np.flatnonzero(~given.isin(asked))
    if len(stray):
        row = int(stray[0])
        image_id, y, x = given[row]
        raise LabelValidationError(
            f"rejected label batch {source}: columns image_id, y, x in row {row} name pixel ({image_id!r}, y={y}, "
            f"x={x}), which round {round_id} never queried ({len(stray)} of {len(labels)} rows)",
            row=row, reason="not queried", n_bad=len(stray))


def _column_problem(name: str, column: pa.ChunkedArray) -> str | None:
    """Why `column` cannot hold the label column `name` without changing a value, or None when it can."""
    wanted = LABEL_SCHEMA.field(name).type
    kind = column.type
    values = column.to_numpy(zero_copy_only=False)

    def first(description: str, expected: str, rows: np.ndarray | None = None) -> str:
        row = 0 if rows is None or not rows.any() else int(np.flatnonzero(rows)[0])
        shown = values[row] if len(values) else None
        shown = shown.item() if isinstance(shown, np.generic) else shown  # 2.5, not np.float64(2.5)
        return f"holds {description} ({shown!r} in row {row}), not {expected}"

    if pa.types.is_string(wanted):
        return None if pa.types.is_string(kind) or pa.types.is_large_string(kind) else first(_kind(kind), "text")
    if pa.types.is_timestamp(wanted):
        return None if pa.types.is_timestamp(kind) else first(_kind(kind), "timestamps")
    numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind)
    if pa.types.is_floating(wanted):
        return None if numeric else first(_kind(kind), "numbers")
    if not numeric:
        return first(_kind(kind), "integers")
    if pa.types.is_floating(kind):
        fractional = ~np.isfinite(values) | (values != np.floor(values))
        return first("fractional numbers" if fractional.any() else "floats", "integers", fractional)
    info = np.iinfo(wanted.to_pandas_dtype())
    outside = (values < info.min) | (values > info.max)
    if outside.any():
        return first(f"values outside {wanted}", f"{wanted} integers", outside)
    return None


def _kind(kind: pa.DataType) -> str:
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "text"
    if pa.types.is_boolean(kind):
        return "booleans"
    return str(kind)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class LabelStore:
    """The append-only table of labelled pixels at `path`, validated against the dataset it labels.

    image_sizes: image id -> (H, W) at the working resolution, for every image that may be labelled.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_sizes: Mapping[str, tuple[int, int]],
        num_classes: int,
        ignore_index: int,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a real class id (num_classes = {num_classes})")
        self.path = Path(path)
        self.image_sizes = dict(image_sizes)
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def read(self) -> pd.DataFrame:
        """Every stored label in append order; an empty, correctly typed table when nothing is stored yet."""
        if not self.path.exists():
            return LABEL_SCHEMA.empty_table().to_pandas()
        labels = read_labels(self.path)
        repeated = labels.duplicated(PIXEL_KEY)
        if repeated.any():
            first = labels[repeated].iloc[0]
            raise LabelFileError(
                f"label store {self.path} labels {int(repeated.sum())} pixels more than once, "
                f"e.g. {first['image_id']!r} y={first['y']} x={first['x']}"
            )
        return labels

    def append(self, batch: pd.DataFrame) -> AppendResult:
        """Validate `batch` whole, then add its new rows atomically.

        Rows repeating a stored label exactly (same pixel, same class) are skipped and counted, so re-ingesting
        a batch changes nothing; a batch without rows is a no-op. Any bad row rejects the whole batch with
        `LabelValidationError` and leaves the stored file untouched.
        """
        _check_columns(batch)
        if batch.empty:
            return AppendResult(added=0, duplicates=0)
        if not self.path.exists():
            # Nothing is stored to clash with, so a bad batch is found before its folder and lock file are made.
            self._validate(batch, LABEL_SCHEMA.empty_table().to_pandas())
        # The lock makes read-validate-replace one step for every process (web annotator, flows, CLI).
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(self.path.with_name(f".{self.path.name}.lock")):
            stored = self.read()
            rows, is_duplicate = self._validate(batch, stored)
            new_rows = rows[~is_duplicate]
            if len(new_rows):
                _write_atomic(pd.concat([stored, new_rows], ignore_index=True), self.path)
        return AppendResult(added=len(new_rows), duplicates=int(is_duplicate.sum()))

    def labelled_pixels(self, image_id: str, *, include_void: bool = True) -> np.ndarray:
        """The (n, 2) int64 (y, x) pixels of `image_id` that have a label, in append order."""
        if image_id not in self.image_sizes:
            raise UnknownImageError(f"unknown image id {image_id!r}: not one of the label store's images")
        labels = self.read()
        keep = labels["image_id"] == image_id
        if not include_void:
            keep &= labels["class_id"] != self.ignore_index
        return labels.loc[keep, ["y", "x"]].to_numpy(dtype=np.int64)

    def _validate(self, batch: pd.DataFrame, stored: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
        """Return the batch in the store's dtypes and which of its rows are exact duplicates; raise if any is bad."""
        original = batch.reset_index(drop=True)
        values = _coerce(original)
        checks = self._row_checks(values)
        bad = np.logical_or.reduce([failed for failed, _ in checks])

        # Only rows with a valid image, pixel and class can clash with another label of the same pixel.
        rows = values[~bad].astype({"y": np.int32, "x": np.int32, "class_id": np.int16, "round": np.int32})
        stored_class = stored.set_index(PIXEL_KEY)["class_id"]
        previous = stored_class.reindex(pd.MultiIndex.from_frame(rows[PIXEL_KEY])).to_numpy(dtype=float)
        clashes_in_batch = (rows.groupby(PIXEL_KEY)["class_id"].transform("nunique") > 1).to_numpy()
        clashes_with_store = ~np.isnan(previous) & (previous != rows["class_id"].to_numpy())
        in_conflict = np.zeros(len(values), dtype=bool)
        in_conflict[rows.index] = clashes_in_batch | clashes_with_store
        checks.append((in_conflict, lambda row: _conflict_reason(rows.loc[row.name], stored_class)))
        bad |= in_conflict

        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            row = original.iloc[first]
            reason = next(describe for failed, describe in checks if failed[first])(row)
            raise LabelValidationError(
                f"rejected label batch: {int(bad.sum())} of {len(batch)} rows are bad; first bad row "
                f"{batch.index[first]} (image_id={row['image_id']!r}, y={row['y']}, x={row['x']}): {reason}",
                row=batch.index[first],
                reason=reason,
                n_bad=int(bad.sum()),
            )
        # No row is bad, so `rows` is the whole batch and `previous` lines up with it.
        typed = _to_table(rows).to_pandas()
        return typed, ~np.isnan(previous) | typed.duplicated(PIXEL_KEY).to_numpy()

    def _row_checks(self, values: pd.DataFrame) -> list[tuple[np.ndarray, Callable[[pd.Series], str]]]:
        """(failed per row, why) for every per-row rule, in the order a row's first failure is reported."""
        height = values["image_id"].map({image_id: h for image_id, (h, _) in self.image_sizes.items()})
        width = values["image_id"].map({image_id: w for image_id, (_, w) in self.image_sizes.items()})

        def integer_in(name: str, low: object, high: object) -> pd.Series:
            column = values[name]
            return (column == np.floor(column)) & (column >= low) & (column < high)

        def size(row: pd.Series) -> tuple[int, int]:
            return self.image_sizes[row["image_id"]]

        def numeric(name: str, expected: str, otherwise: Callable[[pd.Series], str]) -> Callable[[pd.Series], str]:
            # A value that is no number at all (text, a boolean) is named as such rather than as out of range.
            return lambda row: _not_a_number(name, row[name], expected) or otherwise(row)

        is_class = integer_in("class_id", 0, self.num_classes) | (values["class_id"] == self.ignore_index)
        checks = [
            (height.isna(), lambda row: f"unknown image id {row['image_id']!r}"),
            (~integer_in("y", 0, height),
             numeric("y", "an integer", lambda row: f"y={row['y']} is not an integer in [0, {size(row)[0]})")),
            (~integer_in("x", 0, width),
             numeric("x", "an integer", lambda row: f"x={row['x']} is not an integer in [0, {size(row)[1]})")),
            (~is_class, numeric("class_id", "an integer", lambda row: f"class_id={row['class_id']} is neither in "
                                f"[0, {self.num_classes}) nor the void index {self.ignore_index}")),
            (~integer_in("round", 0, _INT32_MAX + 1),
             numeric("round", "an integer", lambda row: f"round={row['round']} is not an integer >= 0")),
            (values["source"].isna(), lambda row: "source is missing or empty"),
            (values["annotator"].isna(), lambda row: "annotator is missing or empty"),
            (~(np.isfinite(values["seconds"]) & (values["seconds"] >= 0)),
             numeric("seconds", "a number", lambda row: f"seconds={row['seconds']} is not a finite number >= 0")),
            (values["time"].isna(), lambda row: "time is missing or not a timestamp"),
        ]
        return [(failed.to_numpy(dtype=bool), describe) for failed, describe in checks]


def _check_columns(batch: pd.DataFrame) -> None:
    if not isinstance(batch, pd.DataFrame):
        raise LabelValidationError(f"rejected label batch: expected a pandas DataFrame, got {type(batch).__name__}")
    missing = [name for name in LABEL_COLUMNS if name not in batch.columns]
    unexpected = [name for name in batch.columns if name not in LABEL_COLUMNS]
    if missing or unexpected:
        raise LabelValidationError(
            f"rejected label batch: missing columns {missing}, unexpected columns {unexpected}; "
            f"expected exactly {LABEL_COLUMNS}"
        )


def _coerce(batch: pd.DataFrame) -> pd.DataFrame:
    """The batch with numbers as float64 and times as UTC timestamps; whatever is not one becomes NaN/NaT.

    Text is never read as a number: "12" in `y` is refused (a CSV must be parsed with its types first), as are
    booleans, which pandas would otherwise count as 0 and 1.
    """

    def text(column: pd.Series) -> pd.Series:
        return column.where(column.map(lambda value: isinstance(value, str) and value != ""))

    def number(column: pd.Series) -> pd.Series:
        if not (pd.api.types.is_integer_dtype(column) or pd.api.types.is_float_dtype(column)):
            column = column.where(column.map(_is_number))
        return pd.to_numeric(column, errors="coerce").astype("float64")

    values = pd.DataFrame(
        {
            "image_id": text(batch["image_id"]),
            "source": text(batch["source"]),
            "annotator": text(batch["annotator"]),
            "time": pd.to_datetime(batch["time"], utc=True, format="ISO8601", errors="coerce").astype(
                "datetime64[us, UTC]"
            ),
        }
    )
    for name in ("y", "x", "class_id", "round", "seconds"):
        values[name] = number(batch[name])
    return values[LABEL_COLUMNS]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _not_a_number(name: str, value: object, expected: str) -> str | None:
    """Why `value` is no number at all (text, a boolean, missing), or None when it is one."""
    if _is_number(value):
        return None
    if isinstance(value, str):
        kind = "text"
    elif value is None or value is pd.NA or value is pd.NaT:
        kind = "missing"
    else:
        kind = type(value).__name__
    return f"{name}={value!r} is {kind}, not {expected}"


def _conflict_reason(row: pd.Series, stored_class: pd.Series) -> str:
    key = (row.image_id, row.y, row.x)
    if key in stored_class.index and stored_class[key] != row.class_id:
        return f"the pixel is already labelled class {stored_class[key]}, not {row.class_id}"
    return "the batch gives this pixel more than one class"


def _to_table(labels: pd.DataFrame) -> pa.Table:
    """`labels` as an Arrow table with the label schema."""
    columns = {name: labels[name].to_numpy() for name in LABEL_COLUMNS}
    # Hand Arrow naive UTC times: its pandas path reads tz-aware columns through an API pandas 3.1 deprecates.
    columns["time"] = labels["time"].dt.tz_convert(None).to_numpy()
    return pa.table(columns, schema=LABEL_SCHEMA)


def _write_atomic(labels: pd.DataFrame, path: Path) -> None:
    """Write `labels` to `path` so that readers see the old file or the new one, never a partial one."""
    table = _to_table(labels)
    atomic_write(path, lambda file: pq.write_table(table, file))
