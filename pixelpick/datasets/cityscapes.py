"""Cityscapes fine annotations, mapped to the 19 training classes, optionally downsampled once into a disk cache.

Originals: `leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png` and `gtFine/<split>/<city>/<stem>_gtFine_labelIds.png`.
With `downsample` 2 or 4 the split is written once to the sibling folder `<root>_d<factor>` (images bilinear,
labels nearest and already converted to trainIds, as `<stem>_gtFine_labelTrainIds.png`) and read from there, so
training and validation always share one resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pixelpick.datasets.base import ClassInfo, LabelSpace, SegmentationDataset
from pixelpick.errors import DatasetError
from pixelpick.io import atomic_write, write_json

# Official trainId colours; each key is a letter of the name.
CITYSCAPES_CLASSES = (
    ClassInfo("road", (128, 64, 128), "r"),
    ClassInfo("sidewalk", (244, 35, 232), "s"),
    ClassInfo("building", (70, 70, 70), "b"),
    ClassInfo("wall", (102, 102, 156), "w"),
    ClassInfo("fence", (190, 153, 153), "f"),
    ClassInfo("pole", (153, 153, 153), "p"),
    ClassInfo("traffic light", (250, 170, 30), "l"),
    ClassInfo("traffic sign", (220, 220, 0), "g"),
    ClassInfo("vegetation", (107, 142, 35), "v"),
    ClassInfo("terrain", (152, 251, 152), "e"),
    ClassInfo("sky", (70, 130, 180), "k"),
    ClassInfo("person", (220, 20, 60), "o"),
    ClassInfo("rider", (255, 0, 0), "i"),
    ClassInfo("car", (0, 0, 142), "c"),
    ClassInfo("truck", (0, 0, 70), "t"),
    ClassInfo("bus", (0, 60, 100), "u"),
    ClassInfo("train", (0, 80, 100), "n"),
    ClassInfo("motorcycle", (0, 0, 230), "m"),
    ClassInfo("bicycle", (119, 11, 32), "y"),
)
CITYSCAPES_IGNORE = 19
CITYSCAPES_LABEL_SPACE = LabelSpace(
    classes=CITYSCAPES_CLASSES,
    ignore_index=CITYSCAPES_IGNORE,
    mean=(0.2869, 0.3251, 0.2839),
    std=(0.1870, 0.1902, 0.1872),
)

# labelId -> trainId; every id not listed (unlabeled, ego vehicle, license plate stored as 255, ...) is ignored.
_TRAIN_ID_OF_LABEL_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
LABEL_ID_TO_TRAIN_ID = np.full(256, CITYSCAPES_IGNORE, dtype=np.int64)
LABEL_ID_TO_TRAIN_ID[list(_TRAIN_ID_OF_LABEL_ID)] = list(_TRAIN_ID_OF_LABEL_ID.values())

DOWNSAMPLE_FACTORS = (1, 2, 4)
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_ID_SUFFIX = "_gtFine_labelIds.png"
_TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"


class CityscapesDataset(SegmentationDataset):
    """Cityscapes at full resolution, or its `<root>_d<factor>` cache when `downsample` > 1."""

    label_space = CITYSCAPES_LABEL_SPACE
    mask_lut = LABEL_ID_TO_TRAIN_ID
    mask_suffix = _LABEL_ID_SUFFIX

    def __init__(
        self, root: Path | str, split: str, *, downsample: int = 1, image_size: tuple[int, int] | None = None
    ) -> None:
        original_root = root
        if downsample not in DOWNSAMPLE_FACTORS:
            raise DatasetError(f"cityscapes downsample must be one of {DOWNSAMPLE_FACTORS}, got {downsample}")
        if downsample > 1:
            root = build_downsampled_split(Path(root), split, downsample)
            self.mask_lut = None  # the cache already holds trainIds
            self.mask_suffix = _TRAIN_ID_SUFFIX
        self.downsample = downsample
        self.source_root = Path(original_root)
        super().__init__(root, split, image_size=image_size)

    def _splits_present(self) -> list[str]:
        return [path.name for path in (self.root / "leftImg8bit").glob("*") if path.is_dir()]

    def _image_files(self) -> list[Path]:
        return list((self.root / "leftImg8bit" / self.split).glob(f"*/*{_IMAGE_SUFFIX}"))

    def _mask_file(self, image_file: Path) -> Path:
        return _gt_file(self.root, self.split, image_file, self.mask_suffix)

    def source_paths(self) -> tuple[list[Path], list[Path]]:
        # The original files, not the downsampled cache built from them.
        return [self.source_root / "leftImg8bit" / self.split], [self.source_root / "gtFine" / self.split]


def _gt_file(root: Path, split: str, image_file: Path, suffix: str) -> Path:
    """`gtFine/<split>/<city>/<stem><suffix>` for the image `.../<city>/<stem>_leftImg8bit.png`."""
    stem = image_file.name.removesuffix(_IMAGE_SUFFIX)
    return root / "gtFine" / split / image_file.parent.name / f"{stem}{suffix}"


def build_downsampled_split(root: Path, split: str, factor: int) -> Path:
    """Write `split` of `root` at 1/`factor` resolution into `<root>_d<factor>` once; return that cache root.

    Every file is written atomically and a per-split marker is written last, so an interrupted build is simply
    redone and a finished one is never rebuilt.
    """
    cache_root = root.with_name(f"{root.name}_d{factor}")
    marker = cache_root / f"cache_{split}.json"
    if marker.is_file():
        return cache_root
    source = CityscapesDataset(root, split)  # validates the root and the split
    for image_id in source.image_ids:
        image = Image.fromarray(source.load_image(image_id))
        small_size = (image.width // factor, image.height // factor)
        _save_png(image.resize(small_size, Image.Resampling.BILINEAR), cache_root / image_id)
        if source.has_masks:
            train_ids = Image.fromarray(source.load_mask(image_id).astype(np.uint8))
            cached_mask = _gt_file(cache_root, split, Path(image_id), _TRAIN_ID_SUFFIX)
            _save_png(train_ids.resize(small_size, Image.Resampling.NEAREST), cached_mask)
    write_json({"source": str(root), "split": split, "factor": factor, "images": len(source)}, marker)
    return cache_root


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda file: image.save(file, format="PNG"))
