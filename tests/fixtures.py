"""Writers for tiny datasets in each loader's exact on-disk format (a few pixels per image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pixelpick.datasets.voc import VOC_CLASSES

CLASSES_YAML = """\
ignore_index: 255
classes:
  - {name: background, colour: [0, 0, 0], key: b}
  - {name: cell, colour: [255, 0, 0], key: c}
  - {name: nucleus, colour: [0, 0, 255], key: "n"}
"""


def save_png(path: Path, array: np.ndarray, *, palette: list[int] | None = None) -> Path:
    """Write `array` as a PNG (RGB, 8-bit grey, or a palette image when `palette` is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, np.uint8))
    if palette is not None:
        image.putpalette(palette)  # turns the grey image into a palette image holding the same indices
    image.save(path)
    return path


def solid_image(colour: tuple[int, int, int], size: tuple[int, int]) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.uint8), (*size, 3)).copy()


def random_image(seed: int, size: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def write_camvid(root: Path, masks: dict[str, dict[str, np.ndarray]], *, annotated: bool = True) -> Path:
    """`masks[split][name]` is a label map; writes `<split>/<name>` (a random image) and `<split>annot/<name>`."""
    for split, by_name in masks.items():
        for index, (name, mask) in enumerate(sorted(by_name.items())):
            save_png(root / split / name, random_image(index, mask.shape))
            if annotated:
                save_png(root / f"{split}annot" / name, mask)
    return root


def cityscapes_stem(city: str, index: int) -> str:
    return f"{city}_{index:06d}_000019"


def write_cityscapes(root: Path, split: str, label_ids: dict[str, list[np.ndarray]]) -> Path:
    """`label_ids[city]` lists labelId maps; each gets a solid-colour image and a `_gtFine_labelIds.png`."""
    for city, maps in label_ids.items():
        for index, label_map in enumerate(maps):
            stem, gt = cityscapes_stem(city, index), root / "gtFine" / split / city
            colour = (10 * index + 5, 100, 200)
            image_file = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            save_png(image_file, solid_image(colour, label_map.shape))
            save_png(gt / f"{stem}_gtFine_labelIds.png", label_map)
            # The real gtFine also ships colour and instance PNGs; the loader must ignore them.
            save_png(gt / f"{stem}_gtFine_color.png", solid_image((1, 2, 3), label_map.shape))
    return root


def voc_palette() -> list[int]:
    palette = [channel for info in VOC_CLASSES for channel in info.colour]
    palette += [0, 0, 0] * (255 - len(VOC_CLASSES)) + [224, 224, 192]  # 255: VOC's cream boundary colour
    return palette


def write_voc(root: Path, splits: dict[str, dict[str, np.ndarray]]) -> Path:
    """`splits[split][name]` is a class map (255 = boundary); writes JPEGs, palette PNGs and the split lists."""
    for split, by_name in splits.items():
        for name, mask in by_name.items():
            path = root / "JPEGImages" / f"{name}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(solid_image((120, 60, 30), mask.shape)).save(path, quality=95)
            save_png(root / "SegmentationClass" / f"{name}.png", mask, palette=voc_palette())
        split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text("".join(f"{name}\n" for name in by_name))
    return root


def with_border(mask: np.ndarray, value: int = 255) -> np.ndarray:
    """`mask` with a one-pixel frame of `value`, like VOC's object boundary band."""
    framed = mask.copy()
    framed[0, :] = framed[-1, :] = framed[:, 0] = framed[:, -1] = value
    return framed
