"""CamVid in the SegNet layout (360x480 PNGs): `train/`, `trainannot/`, `val/`, `valannot/`, `test/`, `testannot/`.

A frame and its label map share a file name; label values are the 11 class ids below, and 11 is void.
The bundled synthetic dataset is written in this same layout and read with this loader.
"""

from __future__ import annotations

from pathlib import Path

from pixelpick.datasets.base import ClassInfo, LabelSpace, SegmentationDataset

# SegNet's colours; each key is a letter of the name (K sKy, V paVement, D peDestrian, I bIcyclist, ...).
CAMVID_CLASSES = (
    ClassInfo("sky", (128, 128, 128), "k"),
    ClassInfo("building", (128, 0, 0), "b"),
    ClassInfo("pole", (192, 192, 128), "p"),
    ClassInfo("road", (128, 64, 128), "r"),
    ClassInfo("pavement", (60, 40, 222), "v"),
    ClassInfo("tree", (128, 128, 0), "t"),
    ClassInfo("sign", (192, 128, 128), "s"),
    ClassInfo("fence", (64, 64, 128), "f"),
    ClassInfo("car", (64, 0, 128), "c"),
    ClassInfo("pedestrian", (64, 64, 0), "d"),
    ClassInfo("bicyclist", (0, 128, 192), "i"),
)
CAMVID_VOID = 11

CAMVID_LABEL_SPACE = LabelSpace(
    classes=CAMVID_CLASSES,
    ignore_index=CAMVID_VOID,
    mean=(0.4119, 0.4251, 0.4327),
    std=(0.2741, 0.2851, 0.2828),
)

CAMVID_SPLITS = ("train", "val", "test")


class CamVidDataset(SegmentationDataset):
    """CamVid (or the synthetic set): images in `<root>/<split>/*.png`, masks in `<root>/<split>annot/`."""

    label_space = CAMVID_LABEL_SPACE

    def _splits_present(self) -> list[str]:
        return [split for split in CAMVID_SPLITS if (self.root / split).is_dir()]

    def _image_files(self) -> list[Path]:
        return list((self.root / self.split).glob("*.png"))

    def _mask_file(self, image_file: Path) -> Path:
        return self.root / f"{self.split}annot" / image_file.name

    def source_paths(self) -> tuple[list[Path], list[Path]]:
        return [self.root / self.split], [self.root / f"{self.split}annot"]
