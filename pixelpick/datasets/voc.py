"""PASCAL VOC 2012 segmentation from a local copy (never downloaded).

`root` is the `VOC2012` folder: `JPEGImages/<name>.jpg`, `SegmentationClass/<name>.png` (palette PNGs whose
indices are the class ids, 255 on the object boundary band) and `ImageSets/Segmentation/<split>.txt`.
"""

from __future__ import annotations

from pathlib import Path

from pixelpick.datasets.base import IMAGENET_MEAN, IMAGENET_STD, ClassInfo, LabelSpace, SegmentationDataset
from pixelpick.errors import DatasetError


def _voc_colour(class_id: int) -> tuple[int, int, int]:
    """VOC's palette: the bits of the class id spread over the high bits of r, g and b."""
    red = green = blue = 0
    for shift in range(7, -1, -1):
        red |= ((class_id >> 0) & 1) << shift
        green |= ((class_id >> 1) & 1) << shift
        blue |= ((class_id >> 2) & 1) << shift
        class_id >>= 3
    return red, green, blue


_VOC_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# The reference's VOC key map: the keyboard read row by row, one key per class id.
_VOC_KEYS = "qwertyuiopasdfghjklzx"

VOC_CLASSES = tuple(
    ClassInfo(name, _voc_colour(class_id), key)
    for class_id, (name, key) in enumerate(zip(_VOC_NAMES, _VOC_KEYS, strict=True))
)
VOC_LABEL_SPACE = LabelSpace(classes=VOC_CLASSES, ignore_index=255, mean=IMAGENET_MEAN, std=IMAGENET_STD)


class VOCDataset(SegmentationDataset):
    """VOC 2012: the split's image names come from `ImageSets/Segmentation/<split>.txt`."""

    label_space = VOC_LABEL_SPACE

    def _splits_present(self) -> list[str]:
        return [path.stem for path in (self.root / "ImageSets" / "Segmentation").glob("*.txt")]

    def _image_files(self) -> list[Path]:
        split_file = self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        names = split_file.read_text().split()
        paths = [self.root / "JPEGImages" / f"{name}.jpg" for name in names]
        missing = [path for path in paths if not path.is_file()]
        if missing:
            raise DatasetError(f"{split_file} lists {len(missing)} images that do not exist, e.g. {missing[0]}")
        return paths

    def _mask_file(self, image_file: Path) -> Path:
        return self.root / "SegmentationClass" / f"{image_file.stem}.png"

    def source_paths(self) -> tuple[list[Path], list[Path]]:
        split_file = self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        return [split_file, self.root / "JPEGImages"], [self.root / "SegmentationClass"]
