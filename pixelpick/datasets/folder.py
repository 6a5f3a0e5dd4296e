"""A user's own images: a folder of pictures, optional dense masks, and a classes file.

Layout (split "train" is the root itself; any other split is a subfolder `<root>/<split>/` with the same shape):

    <root>/classes.yaml          (or classes.json) the label space, see `load_classes_file`
    <root>/images/**.{png,jpg}   the images; nested folders are fine
    <root>/masks/**.png          optional: one class-index PNG per image, same relative path, `.png` suffix
    <root>/val/images/...        optional evaluation split "val" (usually with masks)

The pool needs no ground truth: without `masks/` the split simply has `has_masks = False`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pixelpick.datasets.base import IMAGENET_MEAN, IMAGENET_STD, ClassInfo, LabelSpace, SegmentationDataset
from pixelpick.errors import ClassesFileError, DatasetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
CLASSES_FILE_NAMES = ("classes.yaml", "classes.yml", "classes.json")
_TOP_LEVEL_KEYS = {"classes", "ignore_index", "mean", "std"}
_CLASS_KEYS = {"name", "colour", "key"}
_Fail = Callable[[str], ClassesFileError]  # builds an error that names the file


class FolderDataset(SegmentationDataset):
    """Images under `<split folder>/images/`, masks under `<split folder>/masks/`, classes from a classes file."""

    def __init__(
        self,
        root: Path | str,
        split: str,
        *,
        classes_file: Path | str | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        root = Path(root)
        images = root / "images"
        if split == "train" and not images.is_dir():
            # The usual mistake is a folder of photos given as the root: say where they go, not which splits exist.
            raise DatasetError(f"no {images} folder: a folder dataset keeps its photos under images/ (optional: "
                               "masks/, val/images/, val/masks/; and classes.yaml beside images/)")
        self.classes_file = Path(classes_file) if classes_file else find_classes_file(root)
        self.label_space = load_classes_file(self.classes_file)
        super().__init__(root, split, image_size=image_size)

    def _split_folder(self, split: str) -> Path:
        return self.root if split == "train" else self.root / split

    def _splits_present(self) -> list[str]:
        candidates = ["train"] + [path.name for path in self.root.iterdir() if path.is_dir()]
        return [split for split in candidates if (self._split_folder(split) / "images").is_dir()]

    def _image_files(self) -> list[Path]:
        images = self._split_folder(self.split) / "images"
        return [path for path in images.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]

    def _mask_file(self, image_file: Path) -> Path:
        folder = self._split_folder(self.split)
        return (folder / "masks" / image_file.relative_to(folder / "images")).with_suffix(".png")

    def source_paths(self) -> tuple[list[Path], list[Path]]:
        folder = self._split_folder(self.split)
        return [self.classes_file, folder / "images"], [folder / "masks"]


def find_classes_file(root: Path) -> Path:
    """The classes file in `root` (classes.yaml, classes.yml or classes.json)."""
    for name in CLASSES_FILE_NAMES:
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"no classes file in {root}; expected one of {', '.join(CLASSES_FILE_NAMES)}")


def load_classes_file(path: Path | str) -> LabelSpace:
    """Read and strictly validate a classes file (YAML or JSON) into a LabelSpace.

    Format::

        ignore_index: 255            # optional, default 255
        mean: [0.485, 0.456, 0.406]  # optional, default ImageNet statistics
        std: [0.229, 0.224, 0.225]
        classes:
          - {name: sky, colour: [128, 128, 128], key: k}
          - ...

    Class ids follow the list order. Names and keys must be unique (keys case-insensitively, one character each);
    every problem raises ClassesFileError naming the file and the entry.
    """
    path = Path(path)
    document = _parse(path)

    def fail(problem: str) -> ClassesFileError:
        return ClassesFileError(f"classes file {path}: {problem}")

    if not isinstance(document, dict):
        raise fail("expected a mapping with a 'classes' list at the top level")
    unknown = set(document) - _TOP_LEVEL_KEYS
    if unknown:
        raise fail(f"unknown top-level keys {sorted(unknown)}; allowed: {sorted(_TOP_LEVEL_KEYS)}")
    entries = document.get("classes")
    if not isinstance(entries, list) or not entries:
        raise fail("'classes' must be a non-empty list")

    classes = [_parse_class(entry, index, fail) for index, entry in enumerate(entries)]
    _check_unique([info.name for info in classes], "name", fail)
    _check_unique([info.key.lower() for info in classes], "key", fail)

    ignore_index = document.get("ignore_index", 255)
    if not _is_int(ignore_index) or 0 <= ignore_index < len(classes):
        raise fail(f"ignore_index must be an integer outside the class ids 0..{len(classes) - 1}, got {ignore_index!r}")
    mean = _parse_triple(document.get("mean", IMAGENET_MEAN), "mean", fail)
    std = _parse_triple(document.get("std", IMAGENET_STD), "std", fail)
    if min(std) <= 0:
        raise fail(f"std must be positive, got {list(std)}")
    return LabelSpace(classes=tuple(classes), ignore_index=ignore_index, mean=mean, std=std)


def _parse(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as error:
        raise ClassesFileError(f"cannot read classes file {path}: {error}") from error
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise ClassesFileError(f"classes file {path} is not valid {kind}: {error}") from error


def _parse_class(entry: Any, index: int, fail: _Fail) -> ClassInfo:
    where = f"class #{index}"
    if not isinstance(entry, dict):
        raise fail(f"{where} must be a mapping with name, colour and key, got {entry!r}")
    where = f"class #{index} ({entry.get('name')!r})"
    if set(entry) != _CLASS_KEYS:
        raise fail(f"{where} must have exactly the fields {sorted(_CLASS_KEYS)}, got {sorted(entry)}")
    name, colour, key = entry["name"], entry["colour"], entry["key"]
    if not isinstance(name, str) or not name.strip():
        raise fail(f"{where}: name must be a non-empty string")
    if not isinstance(key, str) or len(key) != 1 or not key.isprintable() or key.isspace():
        raise fail(f"{where}: key must be a single printable character (quote digits), got {key!r}")
    if not (isinstance(colour, list) and len(colour) == 3 and all(_is_int(c) and 0 <= c <= 255 for c in colour)):
        raise fail(f"{where}: colour must be [r, g, b] with integers 0..255, got {colour!r}")
    return ClassInfo(name=name, colour=tuple(colour), key=key)


def _check_unique(values: list[str], field: str, fail: _Fail) -> None:
    seen: dict[str, int] = {}
    for index, value in enumerate(values):
        if value in seen:
            raise fail(f"class #{index} repeats the {field} {value!r} of class #{seen[value]}")
        seen[value] = index


def _parse_triple(value: Any, field: str, fail: _Fail) -> tuple[float, float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(item) for item in value)):
        raise fail(f"{field} must be three numbers, got {value!r}")
    return tuple(float(item) for item in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML `true` must not pass as 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
