"""Segmentation datasets behind one interface, opened by name with `get_dataset(settings.data, split)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pixelpick.datasets.base import ClassInfo, LabelSpace, SegmentationDataset
from pixelpick.datasets.camvid import CAMVID_CLASSES, CAMVID_LABEL_SPACE, CamVidDataset
from pixelpick.datasets.cityscapes import CITYSCAPES_LABEL_SPACE, CityscapesDataset
from pixelpick.datasets.folder import FolderDataset, load_classes_file
from pixelpick.datasets.synthetic import generate_synthetic  # noqa: F401  (part of the package's interface)
from pixelpick.datasets.voc import VOC_LABEL_SPACE, VOCDataset
from pixelpick.errors import DatasetError

__all__ = [
    "CAMVID_CLASSES", "CAMVID_LABEL_SPACE", "CITYSCAPES_LABEL_SPACE", "DATASETS", "VOC_LABEL_SPACE",
    "CamVidDataset", "CityscapesDataset", "ClassInfo", "FolderDataset", "LabelSpace", "SegmentationDataset",
    "VOCDataset", "generate_synthetic", "get_dataset", "load_classes_file",
]


def _open_synthetic(data: Any, split: str) -> SegmentationDataset:
    # The synthetic set is written in CamVid's layout and read as CamVid. It is generated where a new campaign's
    # settings put it (`pixelpick.campaign.prepare_data`), never here: a mistyped root must not become a new dataset.
    if not (data.root / "synthetic.json").is_file():
        raise DatasetError(f"no generated dataset at {data.root} (data.root): the bundled synthetic dataset is "
                           "generated when a new campaign starts")
    return CamVidDataset(data.root, split, image_size=data.image_size)


def _open_camvid(data: Any, split: str) -> SegmentationDataset:
    return CamVidDataset(data.root, split, image_size=data.image_size)


def _open_cityscapes(data: Any, split: str) -> SegmentationDataset:
    return CityscapesDataset(data.root, split, downsample=data.cityscapes_downsample, image_size=data.image_size)


def _open_voc(data: Any, split: str) -> SegmentationDataset:
    return VOCDataset(data.root, split, image_size=data.image_size)


def _open_folder(data: Any, split: str) -> SegmentationDataset:
    return FolderDataset(data.root, split, classes_file=data.classes_file, image_size=data.image_size)


DATASETS: dict[str, Callable[[Any, str], SegmentationDataset]] = {
    "synthetic": _open_synthetic,
    "camvid": _open_camvid,
    "cityscapes": _open_cityscapes,
    "voc": _open_voc,
    "folder": _open_folder,
}


def get_dataset(data_settings: Any, split: str) -> SegmentationDataset:
    """Open `split` of the dataset that `data_settings` (the `data` section of the settings) describes.

    `data_settings` needs `dataset`, `root`, `image_size`, `cityscapes_downsample`, `classes_file` and
    `synthetic` (num_train, num_val, height, width, seed).
    """
    try:
        open_dataset = DATASETS[data_settings.dataset]
    except KeyError:
        raise DatasetError(f"unknown dataset {data_settings.dataset!r}; choose one of {sorted(DATASETS)}") from None
    return open_dataset(data_settings, split)
