"""Annotation jobs: the versioned JSON file that tells annotators which pixels of which images to label.

A job is our own contract with the annotation tool (tools whose contract drifts silently break their users), so
it carries a format name and a version, and `load_job` rejects anything it does not fully understand.
The format is documented in docs/annotation.md.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from pixelpick.errors import AnnotationJobError
from pixelpick.io import atomic_write

if TYPE_CHECKING:
    import pandas as pd

JOB_FORMAT = "pixelpick-annotation-job"
JOB_VERSION = 1
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # ids that end up in file names


def _check_image_id(image_id: str) -> str:
    # The server turns an image id into a path under the dataset root, so only plain relative paths pass.
    parts = image_id.split("/")
    if image_id.startswith("/") or "\\" in image_id or re.match(r"^[A-Za-z]:", image_id) or any(
        part in ("", ".", "..") for part in parts
    ):
        raise ValueError(f"image id {image_id!r} must be a relative POSIX path without '.', '..' or empty parts")
    return image_id


def _check_key(key: str) -> str:
    if len(key) != 1 or not key.isprintable() or key.isspace():
        raise ValueError(f"key must be a single printable, non-space character, got {key!r}")
    return key


ImageId = Annotated[StrictStr, AfterValidator(_check_image_id)]
Pixel = tuple[StrictInt, StrictInt]  # (y, x)


class _Frozen(BaseModel):
    # extra="forbid": a misspelt or newer field is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobClass(_Frozen):
    """One class the annotators choose from; `id` is the class id stored with each label."""

    id: StrictInt
    name: StrictStr = Field(min_length=1)
    colour: tuple[
        Annotated[StrictInt, Field(ge=0, le=255)],
        Annotated[StrictInt, Field(ge=0, le=255)],
        Annotated[StrictInt, Field(ge=0, le=255)],
    ]
    key: Annotated[StrictStr, AfterValidator(_check_key)]


class JobDataset(_Frozen):
    """Which dataset the image ids refer to: its registry name and its root as the exporter saw it."""

    name: StrictStr
    root: StrictStr


class JobImage(_Frozen):
    """One image to label: its id (path relative to the dataset root), working size and queried pixels."""

    image_id: ImageId
    height: StrictInt = Field(gt=0)
    width: StrictInt = Field(gt=0)
    pixels: tuple[Pixel, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _pixels_inside_and_unique(self) -> JobImage:
        seen: set[Pixel] = set()
        for index, (y, x) in enumerate(self.pixels):
            if not (0 <= y < self.height and 0 <= x < self.width):
                raise ValueError(
                    f"pixels[{index}] = [{y}, {x}] is out of bounds of the {self.height}x{self.width} image"
                )
            if (y, x) in seen:
                raise ValueError(f"pixels[{index}] = [{y}, {x}] is a duplicate pixel")
            seen.add((y, x))
        return self


class Job(_Frozen):
    """A validated annotation job. Pixels are labelled image by image, in the order listed."""

    format: Literal["pixelpick-annotation-job"] = JOB_FORMAT
    version: Literal[1] = JOB_VERSION
    job_id: StrictStr = Field(pattern=_NAME_PATTERN)
    campaign: StrictStr = Field(pattern=_NAME_PATTERN)
    round: StrictInt = Field(ge=0)
    created: AwareDatetime
    dataset: JobDataset
    classes: tuple[JobClass, ...] = Field(min_length=1)
    ignore_index: StrictInt
    images: tuple[JobImage, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Job:
        for position, info in enumerate(self.classes):
            if info.id != position:
                raise ValueError(f"classes[{position}].id is {info.id}; class ids must be 0, 1, 2, ... in order")
        _check_unique([info.name for info in self.classes], "classes", "name")
        _check_unique([info.key.lower() for info in self.classes], "classes", "key")
        if 0 <= self.ignore_index < len(self.classes):
            raise ValueError(f"ignore_index {self.ignore_index} is also the id of class {self.ignore_index!r}")
        _check_unique([image.image_id for image in self.images], "images", "image_id")
        return self

    @property
    def num_pixels(self) -> int:
        return sum(len(image.pixels) for image in self.images)


def _check_unique(values: list[str], field: str, what: str) -> None:
    first_index: dict[str, int] = {}
    for index, value in enumerate(values):
        if value in first_index:
            first = first_index[value]
            raise ValueError(f"{field}[{index}] has the duplicate {what} {value!r} (also {field}[{first}])")
        first_index[value] = index


class _Dataset(Protocol):
    """What `export_job` needs of a SegmentationDataset."""

    root: Path
    label_space: Any

    def image_size(self, image_id: str) -> tuple[int, int]: ...


def export_job(
    queries: pd.DataFrame,
    dataset: _Dataset,
    *,
    job_id: str,
    campaign: str,
    round_id: int,
    path: str | Path,
    dataset_name: str | None = None,
) -> Path:
    """Write the queried pixels (`image_id, y, x` rows) of one round as a job file at `path`, atomically.

    Images are listed in id order and each image's pixels row-major, so the same queries give the same file.
    `dataset_name` defaults to the dataset's class name. Raises AnnotationJobError for bad queries.
    """
    missing = {"image_id", "y", "x"} - set(queries.columns)
    if missing:
        raise AnnotationJobError(f"queries lack the columns {sorted(missing)}; expected image_id, y, x")
    space = dataset.label_space
    images = []
    for image_id, rows in queries.sort_values(["image_id", "y", "x"]).groupby("image_id", sort=True):
        height, width = dataset.image_size(image_id)
        pixels = [[int(y), int(x)] for y, x in zip(rows["y"], rows["x"], strict=True)]
        images.append({"image_id": image_id, "height": height, "width": width, "pixels": pixels})
    document = {
        "job_id": job_id,
        "campaign": campaign,
        "round": round_id,
        "created": datetime.now(UTC).isoformat(),
        "dataset": {"name": dataset_name or type(dataset).__name__, "root": str(dataset.root)},
        "classes": [
            {"id": class_id, "name": info.name, "colour": list(info.colour), "key": info.key}
            for class_id, info in enumerate(space.classes)
        ],
        "ignore_index": space.ignore_index,
        "images": images,
    }
    return write_job(_validate(document, source="the exported queries"), path)


def write_job(job: Job, path: str | Path) -> Path:
    """Write `job` to `path` atomically, as JSON with one line per field, class and image (readable diffs)."""
    document = job.model_dump(mode="json")
    lines = [f"  {json.dumps(name)}: {json.dumps(value)}" for name, value in document.items() if name not in _LISTS]
    for name in _LISTS:
        items = ",\n".join(f"    {json.dumps(item)}" for item in document[name])
        lines.append(f'  "{name}": [\n{items}\n  ]')
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    return atomic_write(path, lambda file: file.write(text.encode()))


_LISTS = ("classes", "images")


def load_job(path: str | Path) -> Job:
    """Read and strictly validate a job file; AnnotationJobError names the file and the offending field."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise AnnotationJobError(f"cannot read job file {path}: {error}") from error
    except json.JSONDecodeError as error:
        raise AnnotationJobError(f"job file {path} is not valid JSON: {error}") from error
    if not isinstance(document, dict) or document.get("format") != JOB_FORMAT:
        raise AnnotationJobError(f"job file {path}: field 'format' must be {JOB_FORMAT!r}")
    if document.get("version") != JOB_VERSION:
        raise AnnotationJobError(
            f"job file {path}: unknown version {document.get('version')!r}; this PixelPick reads version {JOB_VERSION}"
        )
    return _validate(document, source=f"job file {path}")


def _validate(document: dict[str, Any], source: str) -> Job:
    try:
        return Job.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(_describe(problem) for problem in error.errors())
        raise AnnotationJobError(f"{source}: {problems}") from None


def _describe(problem: dict[str, Any]) -> str:
    field = ".".join(str(part) for part in problem["loc"])
    message = problem["msg"].removeprefix("Value error, ")
    return f"{field}: {message}" if field else message


def split_job(job: Job, n_batches: int) -> list[Job]:
    """Split `job` by image into `n_batches` jobs with pixel counts as equal as possible (one per annotator).

    Greedy: the largest remaining image goes to the batch with the fewest pixels so far. Each batch keeps the
    job's image order and gets the id `<job_id>-<i>of<n>`.
    """
    if not 1 <= n_batches <= len(job.images):
        raise AnnotationJobError(
            f"cannot split job {job.job_id!r} with {len(job.images)} images into {n_batches} batches"
        )
    order = {image.image_id: position for position, image in enumerate(job.images)}
    batches: list[list[JobImage]] = [[] for _ in range(n_batches)]
    loads = [0] * n_batches
    for image in sorted(job.images, key=lambda image: (-len(image.pixels), order[image.image_id])):
        lightest = loads.index(min(loads))
        batches[lightest].append(image)
        loads[lightest] += len(image.pixels)
    return [
        job.model_copy(
            update={
                "job_id": f"{job.job_id}-{index + 1}of{n_batches}",
                "images": tuple(sorted(images, key=lambda image: order[image.image_id])),
            }
        )
        for index, images in enumerate(batches)
    ]
