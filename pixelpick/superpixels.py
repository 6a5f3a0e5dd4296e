"""Superpixel label expansion: each clicked pixel's class spreads over the superpixel it falls in.

A click says what one pixel is; its SLIC superpixel (scikit-image) is a small region of similar colour that is
very likely the same class. Spreading the click's class over that region gives the model many more (slightly
noisier) targets per click. The expansion is derived at training time and never stored with the labels: the
label store and its snapshots hold exactly the clicked pixels.

Rules: a superpixel is expanded only when every click in it has the same class (one holding clicks of two classes
straddles a boundary, so it is left alone), void ("unsure") answers never expand, and the clicked pixels keep their
own label and full weight; the expanded pixels get the weight the caller gives them.

Segmentations are computed once per image at the dataset's working size and cached as one small `.npy` file per
image, named after the image file's content (the md5 its round's frozen pool records), under a folder named after
the working size and the SLIC parameters. A photo changed under the same name gets its own segmentation, and a cache
folder shared by campaigns, or moved, is never wrong.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pixelpick.datasets.base import SegmentationDataset
from pixelpick.io import atomic_write


@dataclass(frozen=True)
class SuperpixelParams:
    segments: int  # the approximate number of superpixels per image (SLIC's n_segments)
    compactness: float = 10.0  # SLIC's balance of colour against space: higher gives squarer superpixels


def segment(image: np.ndarray, params: SuperpixelParams) -> np.ndarray:
    """SLIC superpixels of an RGB uint8 image: an (H, W) int32 map of segment ids from 0."""
    from skimage.segmentation import slic  # with scipy, a quarter second that a run without superpixels never pays

    return slic(image, n_segments=params.segments, compactness=params.compactness, start_label=0).astype(np.int32)


class SuperpixelCache:
    """Superpixels of a dataset's images, computed on first use and kept on disk (one `.npy` per image)."""

    def __init__(self, dataset: SegmentationDataset, params: SuperpixelParams, cache_dir: Path,
                 contents: Mapping[str, str]) -> None:
        """`contents`: each image id's file md5 (a frozen pool's), what a cached segmentation is named after."""
        self.dataset, self.params, self.contents = dataset, params, contents
        size = "native" if dataset.working_size is None else "x".join(map(str, dataset.working_size))
        self.folder = Path(cache_dir) / "superpixels" / f"{size}-n{params.segments}-c{params.compactness:g}"

    def __call__(self, image_id: str) -> np.ndarray:
        path = self.folder / f"{self.contents[image_id]}.npy"
        if path.is_file():
            try:
                return np.load(path)
            except (OSError, ValueError):
                pass  # a damaged cache file is recomputed below
        segments = segment(self.dataset.load_image(image_id), self.params)
        buffer = io.BytesIO()
        np.save(buffer, segments)
        atomic_write(path, lambda f: f.write(buffer.getvalue()))
        return segments


def expand_clicks(
    segments: np.ndarray, pixels: np.ndarray, classes: np.ndarray, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """The pixels a set of clicks expands to, and their classes: the other pixels of every superpixel whose
    clicks all agree. Void clicks (`ignore_index`) neither expand nor block. Returns ((M, 2) int64 (y, x),
    (M,) int64), row-major, never including a clicked pixel."""
    known = classes != ignore_index
    if not known.any():
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    clicked_segments = segments[pixels[known, 0], pixels[known, 1]]
    agreed: dict[int, int] = {}
    conflicted: set[int] = set()
    for segment_id, class_id in zip(clicked_segments.tolist(), classes[known].tolist()):
        if agreed.setdefault(segment_id, class_id) != class_id:
            conflicted.add(segment_id)
    lookup = np.full(int(segments.max()) + 1, -1, np.int64)
    for segment_id, class_id in agreed.items():
        if segment_id not in conflicted:
            lookup[segment_id] = class_id
    expanded = lookup[segments]  # (H, W): the class a pixel inherits, -1 for none
    expanded[pixels[:, 0], pixels[:, 1]] = -1  # a clicked pixel keeps its own answer, void ones included
    ys, xs = np.nonzero(expanded >= 0)
    return np.stack((ys, xs), axis=1).astype(np.int64), expanded[ys, xs]
