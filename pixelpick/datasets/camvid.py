"""CamVid in the SegNet layout (360x480 PNGs): `train/`, `trainannot/`, `val/`, `valannot/`, `test/`, `testannot/`.

A frame and its label map share a file name; label values are the 11 class ids below, and 11 is void.
The bundled synthetic dataset is written in this same layout and read with this loader.

Two more splits are carved from `train` so that settings can be chosen without looking at the split a report is
measured on: `tune`, a fixed 20% of the train images, and `train-tune`, the other 80%. Tuning runs train on
`train-tune` and evaluate on `tune`; reported runs train on all of `train` and evaluate on `val`.
"""

from __future__ import annotations

import hashlib
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
# The tuning protocol's splits: (the folder they are carved from, whether they hold the tuning images).
TUNING_SPLITS = {"tune": ("train", True), "train-tune": ("train", False)}
TUNE_FRACTION = 0.2
_TUNE_SALT = "pixelpick-tune-v1"  # a new salt would be a new tuning split: results tuned on the old one would not carry


def tuning_names(names: list[str], fraction: float = TUNE_FRACTION) -> set[str]:
    """The file names of the tuning split: the round(fraction x N) names whose sha256 of `pixelpick-tune-v1/<name>`
    is smallest. Depends on the names only (not on the order, the machine or any RNG), so every session carves the
    same split; a name keeps its side however the files are listed."""
    ranked = sorted(names, key=lambda name: hashlib.sha256(f"{_TUNE_SALT}/{name}".encode()).hexdigest())
    return set(ranked[:round(fraction * len(ranked))])


class CamVidDataset(SegmentationDataset):
    """CamVid (or the synthetic set): images in `<root>/<split>/*.png`, masks in `<root>/<split>annot/`."""

    label_space = CAMVID_LABEL_SPACE

    @property
    def _folder(self) -> str:
        """The folder the split's files are in: `train` for the tuning splits."""
        return TUNING_SPLITS[self.split][0] if self.split in TUNING_SPLITS else self.split

    def _splits_present(self) -> list[str]:
        present = [split for split in CAMVID_SPLITS if (self.root / split).is_dir()]
        return present + [split for split, (folder, _) in TUNING_SPLITS.items() if folder in present]

    def _image_files(self) -> list[Path]:
        files = list((self.root / self._folder).glob("*.png"))
        if self.split not in TUNING_SPLITS:
            return files
        tuning, inside = tuning_names([f.name for f in files]), TUNING_SPLITS[self.split][1]
        return [f for f in files if (f.name in tuning) == inside]

    def _mask_file(self, image_file: Path) -> Path:
        return self.root / f"{self._folder}annot" / image_file.name

    def source_paths(self) -> tuple[list[Path], list[Path]]:
        return [self.root / self._folder], [self.root / f"{self._folder}annot"]
