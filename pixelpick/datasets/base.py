"""The dataset interface every loader shares: label spaces and a base class that does all the file work.

A loader subclass only says where a split's images and masks live (`_image_files`, `_mask_file`, `_splits_present`)
and, when the stored mask values are not class ids yet, gives a lookup table (`mask_lut`) that maps them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pixelpick.errors import CorruptImageError, DatasetError, InvalidMaskError, MissingMaskError, UnknownImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# 8-bit modes PIL converts to RGB without losing meaning; 16-bit or float images would be silently clipped.
_IMAGE_MODES = {"RGB", "RGBA", "L", "P", "CMYK"}
# Masks must hold class indices in one channel; a colour-coded RGB mask has to be converted first.
_MASK_MODES = {"L", "P", "I;16", "I"}


@dataclass(frozen=True)
class ClassInfo:
    """One semantic class: its name, display colour and the annotator's keyboard key."""

    name: str
    colour: tuple[int, int, int]
    key: str


@dataclass(frozen=True)
class LabelSpace:
    """The classes of a dataset, its single void/ignore value and its normalisation statistics."""

    classes: tuple[ClassInfo, ...]
    ignore_index: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if 0 <= self.ignore_index < len(self.classes):
            raise ValueError(f"ignore_index {self.ignore_index} collides with class {self.ignore_index}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(info.name for info in self.classes)


def label_space_record(space: LabelSpace) -> dict[str, Any]:
    """A label space as plain data: what checkpoints and frozen pools keep."""
    return {
        "classes": [{"name": c.name, "colour": list(c.colour), "key": c.key} for c in space.classes],
        "ignore_index": space.ignore_index,
        "mean": list(space.mean),
        "std": list(space.std),
    }


def label_space_from_record(record: dict[str, Any]) -> LabelSpace:
    return LabelSpace(
        classes=tuple(ClassInfo(c["name"], tuple(c["colour"]), c["key"]) for c in record["classes"]),
        ignore_index=record["ignore_index"],
        mean=tuple(record["mean"]),
        std=tuple(record["std"]),
    )


class SegmentationDataset:
    """Images (and, when present, dense masks) of one split, addressed by image id.

    An image id is the image's path relative to `root` with POSIX separators; ids are listed sorted. With
    `image_size=(H, W)` every image is resized to that working resolution (bilinear, antialiased) and every mask
    with nearest neighbour, so pixel coordinates always refer to what `load_image` returns. `has_masks` says
    whether the split has ground truth at all (an unlabelled pool has none).
    """

    label_space: LabelSpace
    # Maps raw stored mask values to class ids (or ignore_index); None when masks already hold class ids.
    mask_lut: np.ndarray | None = None

    def __init__(self, root: Path | str, split: str, *, image_size: tuple[int, int] | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.working_size = (int(image_size[0]), int(image_size[1])) if image_size is not None else None
        if self.working_size is not None and min(self.working_size) < 1:
            raise DatasetError(f"image_size must be two positive integers (H, W), got {image_size}")
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist or is not a folder")
        splits = self._splits_present()
        if split not in splits:
            raise DatasetError(f"split {split!r} not found under {self.root}; splits present: {sorted(splits)}")
        self._paths = {path.relative_to(self.root).as_posix(): path for path in self._image_files()}
        self.image_ids = sorted(self._paths)
        self.has_masks = any(self._mask_file(path).is_file() for path in self._paths.values())

    # --- what a loader subclass provides -----------------------------------------------------------------------

    def _splits_present(self) -> list[str]:
        """Names of the splits found under `self.root`."""
        raise NotImplementedError

    def _image_files(self) -> list[Path]:
        """Every image file of `self.split`."""
        raise NotImplementedError

    def _mask_file(self, image_file: Path) -> Path:
        """Where the mask of `image_file` lives (it may not exist)."""
        raise NotImplementedError

    def source_paths(self) -> tuple[list[Path], list[Path]]:
        """(what the split's images and label space are read from, what its masks are read from): the files and
        folders a pipeline stage depends on. They may hold other splits' files too."""
        raise NotImplementedError

    # --- the shared interface ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)})"

    def image_path(self, image_id: str) -> Path:
        """The file holding `image_id`; UnknownImageError when the id is not in this split."""
        try:
            return self._paths[image_id]
        except KeyError:
            raise UnknownImageError(f"image id {image_id!r} is not in split {self.split!r} of {self.root}") from None

    def mask_path(self, image_id: str) -> Path | None:
        """The file holding `image_id`'s mask, or None when it has none."""
        path = self._mask_file(self.image_path(image_id))
        return path if self.has_masks and path.is_file() else None

    def subset(self, image_ids: list[str]) -> SegmentationDataset:
        """This split restricted to `image_ids` (a round's frozen pool); UnknownImageError for an id not here."""
        view = copy.copy(self)
        view._paths = {image_id: self.image_path(image_id) for image_id in image_ids}
        view.image_ids = sorted(view._paths)
        return view

    def has_mask(self, image_id: str) -> bool:
        """Whether `image_id` has a ground-truth mask file (a split may have masks for only some images)."""
        return self.has_masks and self._mask_file(self.image_path(image_id)).is_file()

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) of the image at the working resolution; reads only the file header."""
        if self.working_size is not None:
            self.image_path(image_id)  # still reject unknown ids
            return self.working_size
        path = self.image_path(image_id)
        try:
            with Image.open(path) as image:
                width, height = image.size
        except Exception as error:  # PIL raises many types for a bad file
            raise CorruptImageError(f"cannot read image {path}: {error}") from error
        return height, width

    def load_image(self, image_id: str) -> np.ndarray:
        """The image as uint8 H x W x 3 RGB at the working resolution."""
        path = self.image_path(image_id)
        try:
            with Image.open(path) as image:
                if image.mode not in _IMAGE_MODES:
                    raise CorruptImageError(f"image {path} has mode {image.mode}; expected 8-bit colour or grey")
                rgb = image.convert("RGB")  # decodes the whole file, so truncation is caught here
        except CorruptImageError:
            raise
        except Exception as error:
            raise CorruptImageError(f"cannot read image {path}: {error}") from error
        if self.working_size is not None and rgb.size != self._pil_size():
            rgb = rgb.resize(self._pil_size(), Image.Resampling.BILINEAR)  # PIL antialiases when shrinking
        return np.asarray(rgb, dtype=np.uint8)

    def load_mask(self, image_id: str) -> np.ndarray:
        """The dense mask as int64 H x W: class ids in [0, num_classes) or the ignore index."""
        path = self.image_path(image_id)
        if not self.has_masks:
            raise MissingMaskError(f"split {self.split!r} of {self.root} has no masks")
        mask_path = self._mask_file(path)
        if not mask_path.is_file():
            raise MissingMaskError(f"mask of image {image_id!r} not found: expected {mask_path}")
        raw = self._read_mask(mask_path, expected_size=self._native_pil_size(image_id))
        return self._to_class_ids(raw, mask_path)

    # --- helpers -----------------------------------------------------------------------------------------------

    def _pil_size(self) -> tuple[int, int]:
        height, width = self.working_size
        return width, height

    def _native_pil_size(self, image_id: str) -> tuple[int, int]:
        path = self._paths[image_id]
        try:
            with Image.open(path) as image:
                return image.size
        except Exception as error:
            raise CorruptImageError(f"cannot read image {path}: {error}") from error

    def _read_mask(self, mask_path: Path, expected_size: tuple[int, int]) -> np.ndarray:
        try:
            with Image.open(mask_path) as mask:
                if mask.mode not in _MASK_MODES:
                    raise InvalidMaskError(
                        f"mask {mask_path} has mode {mask.mode}; expected a single-channel PNG of class indices"
                    )
                if mask.size != expected_size:
                    raise InvalidMaskError(
                        f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} (WxH) but its image is "
                        f"{expected_size[0]}x{expected_size[1]}"
                    )
                if self.working_size is not None and mask.size != self._pil_size():
                    mask = mask.resize(self._pil_size(), Image.Resampling.NEAREST)
                return np.asarray(mask).astype(np.int64)
        except InvalidMaskError:
            raise
        except Exception as error:
            raise InvalidMaskError(f"cannot read mask {mask_path}: {error}") from error

    def _to_class_ids(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        space = self.label_space
        if self.mask_lut is not None:
            unmappable = (raw < 0) | (raw >= len(self.mask_lut))
            if unmappable.any():
                raise InvalidMaskError(
                    f"mask {mask_path} holds values {_few(raw[unmappable])} that have no class mapping"
                )
            mask = self.mask_lut[raw]
        else:
            mask = raw
        invalid = ((mask < 0) | (mask >= space.num_classes)) & (mask != space.ignore_index)
        if invalid.any():
            raise InvalidMaskError(
                f"mask {mask_path} holds values {_few(mask[invalid])} outside classes 0..{space.num_classes - 1} "
                f"and ignore index {space.ignore_index}"
            )
        return mask


def _few(values: np.ndarray, limit: int = 8) -> list[int]:
    """The first few distinct values, for an error message."""
    return [int(value) for value in np.unique(values)[:limit]]
