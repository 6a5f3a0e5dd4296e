"""Round trips through labelling tools people already use: Label Studio (JSON tasks) and CVAT (for images 1.1 XML).

    export_label_studio / export_cvat   a job's queried pixels as points to label, with the model's suggestion
                                        and the pixel's uncertainty when the round has them
    import_labels                       the tool's export back into the job's progress database, so that the
                                        round's batch is collected, validated and versioned exactly like labels
                                        made in the built-in annotator

Both tools place a point by its position inside the image, not by a pixel index. A pixel (y, x) is exported at its
centre, x + 0.5 (CVAT: in pixels; Label Studio: in percent of the width, (x + 0.5) / W * 100). Converting back
multiplies by the size and takes the floor. The centre is half a pixel from either edge, so the float error of the
percent (a few 1e-14 pixels) can never move it into a neighbour, whereas rounding would: a centre sits exactly on
the tie, and rounding up lands on the next pixel. A point a tool placed on a pixel's left or top edge is nudged by
EDGE_TOLERANCE before the floor, so a value like 2.9999999999999996 still means pixel 3.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pixelpick.annotation.jobs import Job, JobImage, load_job
from pixelpick.annotation.progress import ProgressStore, check_labels_against_job, default_progress_path
from pixelpick.errors import LabelImportError
from pixelpick.io import atomic_write
from pixelpick.layout import RoundFiles

if TYPE_CHECKING:  # pandas costs the annotator's server 100 MB: imported by the functions that make tables
    import pandas as pd

FORMATS = ("label-studio", "cvat")
EDGE_TOLERANCE = 1e-6  # in pixels: far above float error, far below anything a click can mean
DEFAULT_IMAGE_URL = "/data/local-files/?d={image_id}"
FROM_NAME, TO_NAME = "label", "image"  # the names the Label Studio config gives its tags
QUERIED_LABEL = "queried"  # CVAT: a point nobody has labelled yet
SUGGESTED_ATTRIBUTE = "suggested"
_UNSURE_KEYS = ("u", "0", "9", "8")


# --- coordinates ---------------------------------------------------------------------------------------------------


def pixel_to_percent(index: int, size: int) -> float:
    """The centre of pixel `index` of an axis of `size` pixels, in percent (Label Studio's coordinates)."""
    return (index + 0.5) / size * 100


def position_to_pixel(position: float, size: int) -> int | None:
    """The pixel of an axis of `size` pixels that holds `position` (in pixels), or None outside the image."""
    if not (math.isfinite(position) and 0 <= position <= size):
        return None
    return min(math.floor(position + EDGE_TOLERANCE), size - 1)  # the far edge belongs to the last pixel


def percent_to_pixel(percent: float, size: int) -> int | None:
    return position_to_pixel(percent * size / 100, size)


# --- what a job's round knows about its pixels ------------------------------------------------------------------------


@dataclass(frozen=True)
class Suggestions:
    """Per queried pixel (image_id, y, x): the acquisition score, and the previous model's class and confidence."""

    model_version: str | None = None
    scores: dict[tuple[str, int, int], float] = field(default_factory=dict)
    predicted: dict[tuple[str, int, int], tuple[int, float]] = field(default_factory=dict)


def round_suggestions(job: Job, job_path: Path, *, probs: Path | None = None, use_model: bool = True,
                      with_scores: bool = True) -> Suggestions:
    """What the round folder beside the job holds: scores from `queries.parquet` (unless not `with_scores`: the
    annotator needs none, and reading them costs its server pandas), and after round 0 the model's predictions from
    the round's probability store (`probs.zarr`, or `probs`) when it is still there."""
    files = RoundFiles(job_path.parent)
    pixels = [(image.image_id, y, x) for image in job.images for y, x in image.pixels]
    scores: dict[tuple[str, int, int], float] = {}
    queries = files.queries
    if with_scores and queries.is_file():
        import pandas as pd

        frame = pd.read_parquet(queries)
        if "score" in frame.columns:
            wanted = set(pixels)
            for image_id, y, x, score in zip(frame["image_id"], frame["y"], frame["x"], frame["score"], strict=True):
                key = (image_id, int(y), int(x))
                if key in wanted and np.isfinite(score):
                    scores[key] = float(score)
    predicted: dict[tuple[str, int, int], tuple[int, float]] = {}
    location = probs or files.probs
    model_version = None
    if use_model and job.round > 0 and Path(location).exists():
        predicted = predicted_classes(location, {image.image_id: image.pixels for image in job.images})
        model_version = f"{job.campaign}-r{job.round - 1:02d}"  # a round's store holds the previous round's model
    return Suggestions(model_version, scores, predicted)


def predicted_classes(location: str | Path, pixels: dict[str, list[tuple[int, int]]]
                      ) -> dict[tuple[str, int, int], tuple[int, float]]:
    """The most probable class and its probability at each pixel (image_id -> [(y, x)]), from the probability store
    at `location`; pixels of images the store lacks are left out."""
    from pixelpick.probstore import ProbabilityStore  # zarr is only needed when there is a store

    store = ProbabilityStore(location)
    predicted: dict[tuple[str, int, int], tuple[int, float]] = {}
    for image_id, yx in pixels.items():
        if image_id not in store.image_ids or not len(yx):
            continue
        ys, xs = np.asarray(yx).T
        at_pixels = np.asarray(store.probs(image_id))[:, ys, xs].astype(np.float32)  # (C, n)
        for y, x, class_id, confidence in zip(ys, xs, at_pixels.argmax(0), at_pixels.max(0), strict=True):
            predicted[(image_id, int(y), int(x))] = (int(class_id), float(confidence))
    return predicted


def _unsure_name(job: Job) -> str:
    names = {info.name for info in job.classes}
    return next(name for name in ("unsure", "unsure (void)", "_unsure") if name not in names)


def _class_ids(job: Job) -> dict[str, int]:
    return {**{info.name: info.id for info in job.classes}, _unsure_name(job): job.ignore_index}


def _hex(colour: Iterable[int]) -> str:
    return "#" + "".join(f"{value:02x}" for value in colour)


def _xml(element: ET.Element) -> str:
    ET.indent(element)
    return ET.tostring(element, encoding="unicode") + "\n"


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda file: file.write(text.encode()))


# --- Label Studio ----------------------------------------------------------------------------------------------------


def label_studio_config(job: Job) -> str:
    """The labelling config: the image, and one keypoint label per class (its colour and key) plus "unsure"."""
    view = ET.Element("View")
    ET.SubElement(view, "Header", value=f"Label each point: job {job.job_id}, round {job.round}")
    ET.SubElement(view, "Image", name=TO_NAME, value="$image", zoom="true", zoomControl="true")
    labels = ET.SubElement(view, "KeyPointLabels", name=FROM_NAME, toName=TO_NAME, snap="pixel", strokeWidth="2")
    used = set()
    for info in job.classes:
        ET.SubElement(labels, "Label", value=info.name, background=_hex(info.colour), hotkey=info.key)
        used.add(info.key.lower())
    unsure = {"value": _unsure_name(job), "background": "#808080"}
    free = [key for key in _UNSURE_KEYS if key not in used]
    ET.SubElement(labels, "Label", unsure | ({"hotkey": free[0]} if free else {}))
    return _xml(view)


def _keypoint(image: JobImage, y: int, x: int, labels: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "id": f"p{y}x{x}", "type": "keypointlabels", "from_name": FROM_NAME, "to_name": TO_NAME,
        "original_width": image.width, "original_height": image.height, "image_rotation": 0,
        "value": {"x": pixel_to_percent(x, image.width), "y": pixel_to_percent(y, image.height),
                  "width": 100 / image.width, "keypointlabels": labels},
        **extra,
    }


def label_studio_tasks(job: Job, suggestions: Suggestions, *, image_url: str = DEFAULT_IMAGE_URL) -> list[dict]:
    """One task per image. Its queried pixels are a pre-annotation (`predictions`): with the model's class after
    round 0, unlabelled before. `data.uncertainty` is the image's highest acquisition score, for sorting."""
    names = [info.name for info in job.classes]
    tasks = []
    for image in job.images:
        keys = [(image.image_id, y, x) for y, x in image.pixels]
        scores = [suggestions.scores[key] for key in keys if key in suggestions.scores]
        data: dict[str, Any] = {"image": image_url.format(image_id=image.image_id), "image_id": image.image_id,
                                "pixels": len(keys), "job_id": job.job_id}
        if scores:
            data |= {"uncertainty": max(scores), "mean_uncertainty": sum(scores) / len(scores)}
        points = []
        for (y, x), key in zip(image.pixels, keys, strict=True):
            if key in suggestions.predicted:
                class_id, confidence = suggestions.predicted[key]
                points.append(_keypoint(image, y, x, [names[class_id]], score=confidence))
            else:
                points.append(_keypoint(image, y, x, []))
        confidences = [point["score"] for point in points if "score" in point]
        prediction: dict[str, Any] = {"model_version": suggestions.model_version or "queried-pixels",
                                      "result": points}
        if confidences:
            prediction["score"] = sum(confidences) / len(confidences)
        tasks.append({"data": data, "predictions": [prediction]})
    return tasks


def export_label_studio(job_path: str | Path, out_dir: str | Path, *, image_url: str = DEFAULT_IMAGE_URL,
                        probs: Path | None = None, suggestions: bool = True) -> list[Path]:
    """Write `tasks.json` and `config.xml` for Label Studio into `out_dir`; returns their paths."""
    job_path, out_dir = Path(job_path), Path(out_dir)
    job = load_job(job_path)
    found = round_suggestions(job, job_path, probs=probs, use_model=suggestions)
    tasks = label_studio_tasks(job, found, image_url=image_url)
    return [_write_text(out_dir / "tasks.json", json.dumps(tasks, indent=1) + "\n"),
            _write_text(out_dir / "config.xml", label_studio_config(job))]


def read_label_studio(job: Job, tasks: Any, *, annotator: str | None = None) -> pd.DataFrame:
    """Label Studio's JSON export as label rows. Only submitted annotations count (never predictions); a point
    without a class is skipped (its pixel stays unlabelled), a cancelled annotation ("skip") too."""
    if not isinstance(tasks, list):
        raise LabelImportError("a Label Studio JSON export is a list of tasks; this file holds something else")
    images = {image.image_id: image for image in job.images}
    class_ids = _class_ids(job)
    rows: list[dict[str, Any]] = []
    for task in tasks:
        data = task.get("data", {}) if isinstance(task, dict) else {}
        image = images.get(data.get("image_id"))
        if image is None:
            raise LabelImportError(f"task {task.get('id') if isinstance(task, dict) else task!r} names image "
                                   f"{data.get('image_id')!r}, which is not in job {job.job_id!r}")
        for annotation in task.get("annotations") or []:
            if annotation.get("was_cancelled"):
                continue
            points = [result for result in annotation.get("result") or [] if result.get("type") == "keypointlabels"]
            who = annotator or _label_studio_annotator(annotation.get("completed_by"))
            lead_time = annotation.get("lead_time")
            seconds = lead_time / len(points) if isinstance(lead_time, (int, float)) and points else 0.0
            stamp = annotation.get("updated_at") or annotation.get("created_at")
            for result in points:
                value = result.get("value", {})
                classes = value.get("keypointlabels") or []
                if not classes:
                    continue
                where = f"image {image.image_id!r} at x={value.get('x')}%, y={value.get('y')}%"
                if len(classes) > 1:
                    raise LabelImportError(f"the point on {where} has several classes {classes}")
                if classes[0] not in class_ids:
                    raise LabelImportError(f"the point on {where} has the class {classes[0]!r}, which job "
                                           f"{job.job_id!r} does not have (it has {sorted(class_ids)})")
                x = _number(value.get("x"), where, percent_to_pixel, image.width)
                y = _number(value.get("y"), where, percent_to_pixel, image.height)
                rows.append({"image_id": image.image_id, "y": y, "x": x, "class_id": class_ids[classes[0]],
                             "annotator": who, "seconds": max(float(seconds), 0.0), "time": stamp})
    return _label_rows(job, rows, source="label-studio")


def _label_studio_annotator(completed_by: Any) -> str:
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("email") or completed_by.get("id")
    if isinstance(completed_by, str) and completed_by:
        return completed_by
    return f"label-studio-{completed_by}" if completed_by is not None else "label-studio"


def _number(value: Any, where: str, convert, size: int) -> int:
    pixel = convert(value, size) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if pixel is None:
        raise LabelImportError(f"the point on {where} lies outside the image")
    return pixel


def _label_rows(job: Job, rows: list[dict[str, Any]], *, source: str) -> pd.DataFrame:
    import pandas as pd

    from pixelpick.labels import label_frame

    times = pd.to_datetime(pd.Series([row["time"] for row in rows], dtype=object), utc=True, format="ISO8601",
                           errors="coerce")
    now = pd.Timestamp.now(tz="UTC")
    return label_frame({
        **{name: [row[name] for row in rows] for name in ("image_id", "y", "x", "class_id", "annotator", "seconds")},
        "round": [job.round] * len(rows),
        "source": [source] * len(rows),
        "time": [now if pd.isna(stamp) else stamp for stamp in times],
    })


# --- CVAT --------------------------------------------------------------------------------------------------------


def cvat_xml(job: Job, suggestions: Suggestions) -> str:
    """CVAT for images 1.1: one `points` label per class plus "unsure" and "queried" (a point still to label,
    carrying the model's class in its `suggested` attribute when there is one)."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "name").text = job.job_id
    ET.SubElement(task, "size").text = str(len(job.images))
    ET.SubElement(task, "mode").text = "annotation"
    labels = ET.SubElement(task, "labels")
    entries = [(info.name, _hex(info.colour)) for info in job.classes]
    entries += [(_unsure_name(job), "#808080"), (QUERIED_LABEL, "#ffffff")]
    for name, colour in entries:
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "color").text = colour
        ET.SubElement(label, "type").text = "points"
        attributes = ET.SubElement(label, "attributes")
        if name == QUERIED_LABEL:
            attribute = ET.SubElement(attributes, "attribute")
            for key, text in (("name", SUGGESTED_ATTRIBUTE), ("mutable", "False"), ("input_type", "text"),
                              ("default_value", ""), ("values", "")):
                ET.SubElement(attribute, key).text = text
    names = [info.name for info in job.classes]
    for number, image in enumerate(job.images):
        element = ET.SubElement(root, "image", id=str(number), name=image.image_id, width=str(image.width),
                                height=str(image.height))
        for y, x in image.pixels:
            points = ET.SubElement(element, "points", label=QUERIED_LABEL, source="auto", occluded="0",
                                   points=f"{x + 0.5:.2f},{y + 0.5:.2f}", z_order="0")
            predicted = suggestions.predicted.get((image.image_id, y, x))
            if predicted is not None:
                ET.SubElement(points, "attribute", name=SUGGESTED_ATTRIBUTE).text = names[predicted[0]]
    return _xml(root)


def export_cvat(job_path: str | Path, out_dir: str | Path, *, probs: Path | None = None,
                suggestions: bool = True) -> list[Path]:
    """Write `annotations.xml` (CVAT for images 1.1) into `out_dir`; returns its path."""
    job_path, out_dir = Path(job_path), Path(out_dir)
    job = load_job(job_path)
    found = round_suggestions(job, job_path, probs=probs, use_model=suggestions)
    return [_write_text(out_dir / "annotations.xml", cvat_xml(job, found))]


def read_cvat(job: Job, text: str, *, annotator: str | None = None) -> pd.DataFrame:
    """A CVAT for images 1.1 XML as label rows. Points still labelled "queried" are skipped (not labelled yet).
    An image is found by its name, or by its name without the extension (some writers drop or change it)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as error:
        raise LabelImportError(f"not a CVAT XML file: {error}") from None
    if root.tag != "annotations":
        raise LabelImportError(f"not a CVAT for images XML file: its root is <{root.tag}>, not <annotations>")
    images = {image.image_id: image for image in job.images}
    by_stem: dict[str, list[JobImage]] = {}
    for image in job.images:
        by_stem.setdefault(Path(image.image_id).with_suffix("").as_posix(), []).append(image)
    class_ids = _class_ids(job)
    rows: list[dict[str, Any]] = []
    for element in root.iter("image"):
        name = element.get("name", "")
        image = images.get(name)
        if image is None and len(by_stem.get(Path(name).with_suffix("").as_posix(), [])) == 1:
            image = by_stem[Path(name).with_suffix("").as_posix()][0]
        if image is None:
            raise LabelImportError(f"image {name!r} is not in job {job.job_id!r}")
        # Coordinates are pixels of the image as the tool saw it; scale if it was given another size.
        scale_x = image.width / float(element.get("width") or image.width)
        scale_y = image.height / float(element.get("height") or image.height)
        for shape in element.iter("points"):
            label = shape.get("label")
            if label == QUERIED_LABEL:
                continue
            if label not in class_ids:
                raise LabelImportError(f"a point on image {name!r} has the label {label!r}, which job "
                                       f"{job.job_id!r} does not have (it has {sorted(class_ids)})")
            for pair in (shape.get("points") or "").split(";"):
                where = f"image {name!r} at {pair!r}"
                try:
                    px, py = (float(part) for part in pair.split(","))
                except ValueError:
                    raise LabelImportError(f"the point on {where} is not 'x,y'") from None
                x = _number(px * scale_x, where, position_to_pixel, image.width)
                y = _number(py * scale_y, where, position_to_pixel, image.height)
                rows.append({"image_id": image.image_id, "y": y, "x": x, "class_id": class_ids[label],
                             "annotator": annotator or "cvat", "seconds": 0.0, "time": None})
    return _label_rows(job, rows, source="cvat")


# --- import ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportResult:
    stored: int  # labels added to the job's progress now
    unchanged: int  # labels the progress database held already (the same export imported again)
    done: int  # the job's labelled pixels after the import
    total: int


def read_export(job: Job, path: str | Path, fmt: str, *, annotator: str | None = None) -> pd.DataFrame:
    """A tool's export file as label rows, checked against the job like every batch (queried pixels only, each
    once, classes of the job)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise LabelImportError(f"cannot read {path}: {error}") from None
    if fmt == "label-studio":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise LabelImportError(f"{path} is not valid JSON: {error}") from None
        labels = read_label_studio(job, document, annotator=annotator)
    elif fmt == "cvat":
        labels = read_cvat(job, text, annotator=annotator)
    else:
        raise LabelImportError(f"unknown format {fmt!r}; use one of {list(FORMATS)}")
    if labels.empty:
        raise LabelImportError(f"{path} holds no labelled points of job {job.job_id!r}; nothing to import")
    check_labels_against_job(labels, job)
    return labels


def import_labels(job_path: str | Path, path: str | Path, fmt: str, *, db: str | Path | None = None,
                  annotator: str | None = None) -> ImportResult:
    """Store a tool's export as labels of the job, all or none. `pixelpick human train N` then collects them as
    the round's batch like any other labels (and says "waiting" while pixels are unlabelled)."""
    job = load_job(job_path)
    labels = read_export(job, path, fmt, annotator=annotator)
    store = ProgressStore(db or default_progress_path(job_path), job)
    stored, unchanged = store.record_many(labels, origin=fmt)
    return ImportResult(stored, unchanged, store.done_count(), job.num_pixels)


def export_for_tool(job_path: str | Path, out_dir: str | Path, fmt: str, **options: Any) -> list[Path]:
    if fmt == "label-studio":
        return export_label_studio(job_path, out_dir, **options)
    if fmt == "cvat":
        options.pop("image_url", None)
        return export_cvat(job_path, out_dir, **options)
    raise LabelImportError(f"unknown format {fmt!r}; use one of {list(FORMATS)}")
