"""Paired augmentation that carries sparse labels as points, so a labelled pixel stays exactly one supervised point.

The reference resampled its sparse label mask with NEAREST, which duplicates labelled pixels when scaling up and
drops them when scaling down. Here a labelled integer pixel ``(y, x)`` enters as the
continuous point ``(y + 0.5, x + 0.5)`` at its centre; scaling, cropping and flipping move the point exactly, and the
loss samples the logits there (:func:`point_logits`). A point disappears only when the crop leaves it out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as nnF
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pixelpick.errors import TransformInputError

Sample = dict[str, Any]  # image, points, point_labels, point_weights, mask (see TrainTransform.__call__)


class TrainTransform:
    """Training augmentation: random scale, pad and crop, horizontal flip, photometric jitter, normalisation.

    ``crop_size=None`` keeps the whole scaled image (no crop, so no point is ever lost). All randomness comes from
    the ``generator`` passed to each call, so a seeded generator reproduces a sample exactly.
    """

    def __init__(
        self,
        *,
        crop_size: tuple[int, int] | None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip_p: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float],
        std: Sequence[float],
        ignore_index: int,
    ) -> None:
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.hflip_p = hflip_p
        self.photometric = photometric
        self.mean = list(mean)
        self.std = list(std)
        self.ignore_index = ignore_index

    def __call__(
        self,
        image: np.ndarray,
        *,
        pixels: np.ndarray | None = None,
        pixel_labels: np.ndarray | None = None,
        pixel_weights: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        generator: torch.Generator | None = None,
    ) -> Sample:
        """Augment ``image`` (uint8 HxWx3) with its labelled ``pixels`` ((P, 2) integer (y, x)), their
        ``pixel_labels`` ((P,)) and optional loss ``pixel_weights`` ((P,), default 1), and optionally a dense
        ``mask`` (HxW).

        Returns ``image`` (float 3xhxw, normalised), ``points`` (float (P', 2) continuous (y, x)), ``point_labels``
        (long (P',)), ``point_weights`` (float (P',)) and ``mask`` (long hxw, or None); P' < P only for points
        outside the crop.
        """
        image_t, points, labels, mask_t = _to_tensors(image, pixels, pixel_labels, mask)
        weights = _to_weights(pixel_weights, len(points))
        image_t, mask_t, points = self._random_scale(image_t, mask_t, points, generator)
        if self.crop_size is not None:
            image_t, mask_t, points, (labels, weights) = self._random_crop(
                image_t, mask_t, points, (labels, weights), generator
            )
        flip = _coin(self.hflip_p, generator)  # drawn before the colours, so `photometric` never alters geometry
        if self.photometric:
            image_t = _photometric(image_t, generator)
        image_t = F.normalize(image_t, self.mean, self.std)
        if self.crop_size is not None:
            image_t, mask_t = self._pad_to_crop(image_t, mask_t)
        if flip:
            image_t, mask_t, points = _hflip(image_t, mask_t, points)
        return {"image": image_t, "points": points, "point_labels": labels, "point_weights": weights, "mask": mask_t}

    def _random_scale(
        self, image: torch.Tensor, mask: torch.Tensor | None, points: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        height, width = image.shape[-2:]
        scale = _uniform(*self.scale_range, generator)
        new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
        image = F.resize(image, [new_height, new_width], interpolation=InterpolationMode.BILINEAR, antialias=True)
        if mask is not None:  # NEAREST_EXACT samples at pixel centres, the same geometry the points follow
            mask = F.resize(mask[None], [new_height, new_width], interpolation=InterpolationMode.NEAREST_EXACT)[0]
        # The exact per-axis ratio, not `scale`: sizes were rounded, and a pixel-centre point must stay on its pixel.
        points = points * torch.tensor([new_height / height, new_width / width])
        return image, mask, points

    def _random_crop(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None,
        points: torch.Tensor,
        per_point: tuple[torch.Tensor, ...],
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Cut a crop-sized window out of the image padded bottom/right to at least the crop size; the points
        outside it are dropped together with their entries in each of the `per_point` tensors.

        Only the part of the window inside the image is cut here; the overhang is padded after normalisation
        (:meth:`_pad_to_crop`), so padding is exactly the mean colour and untouched by the colour jitter.
        """
        crop_height, crop_width = self.crop_size
        height, width = image.shape[-2:]
        top = _randint(max(height - crop_height, 0) + 1, generator)
        left = _randint(max(width - crop_width, 0) + 1, generator)
        image = image[:, top : top + crop_height, left : left + crop_width]
        if mask is not None:
            mask = mask[top : top + crop_height, left : left + crop_width]
        points = points - torch.tensor([top, left], dtype=points.dtype)
        inside = (points >= 0).all(dim=1) & (points[:, 0] < crop_height) & (points[:, 1] < crop_width)
        return image, mask, points[inside], tuple(values[inside] for values in per_point)

    def _pad_to_crop(
        self, image: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        crop_height, crop_width = self.crop_size
        height, width = image.shape[-2:]
        padding = [0, 0, crop_width - width, crop_height - height]  # left, top, right, bottom: points stay put
        image = F.pad(image, padding, fill=0.0)  # 0 is the mean colour after normalisation
        if mask is not None:
            mask = F.pad(mask[None], padding, fill=self.ignore_index)[0]
        return image, mask


class EvalTransform:
    """Evaluation/inference transform: normalisation only, returning the same sample layout as TrainTransform."""

    def __init__(self, *, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = list(mean)
        self.std = list(std)

    def __call__(
        self,
        image: np.ndarray,
        *,
        pixels: np.ndarray | None = None,
        pixel_labels: np.ndarray | None = None,
        pixel_weights: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        generator: torch.Generator | None = None,
    ) -> Sample:
        """Normalise ``image``; labelled pixels become their centre points, unmoved. ``generator`` is unused."""
        image_t, points, labels, mask_t = _to_tensors(image, pixels, pixel_labels, mask)
        image_t = F.normalize(image_t, self.mean, self.std)
        weights = _to_weights(pixel_weights, len(points))
        return {"image": image_t, "points": points, "point_labels": labels, "point_weights": weights, "mask": mask_t}


def collate_sparse(samples: Sequence[Sample], *, ignore_index: int) -> dict[str, Any]:
    """Batch transformed samples: stack images (and masks, or None when no sample has one) and pad every sample's
    points to the batch's largest count with label ``ignore_index`` and weight 0, which the loss skips.

    Any other key (an image id, say) is gathered into a list. Use with ``functools.partial`` as a ``collate_fn``.
    """
    n_points = max(len(sample["points"]) for sample in samples)
    points = torch.zeros(len(samples), n_points, 2)
    point_labels = torch.full((len(samples), n_points), ignore_index, dtype=torch.long)
    point_weights = torch.zeros(len(samples), n_points)
    for row, sample in enumerate(samples):
        count = len(sample["points"])
        points[row, :count] = sample["points"]
        point_labels[row, :count] = sample["point_labels"]
        point_weights[row, :count] = sample.get("point_weights", 1.0)
    batch = {key: [sample[key] for sample in samples] for key in samples[0] if key not in _BATCHED_KEYS}
    batch.update(
        image=torch.stack([sample["image"] for sample in samples]),
        points=points,
        point_labels=point_labels,
        point_weights=point_weights,
        mask=_stack_masks([sample["mask"] for sample in samples]),
    )
    if "pseudo_mask" in samples[0]:
        batch["pseudo_mask"] = _stack_masks([sample["pseudo_mask"] for sample in samples])
    return batch


_BATCHED_KEYS = {"image", "points", "point_labels", "point_weights", "mask", "pseudo_mask"}


def point_logits(logits: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``logits`` (N, C, H, W) at continuous ``points`` (N, P, 2) of (y, x): returns (N, C, P).

    A pixel centre (y + 0.5, x + 0.5) gives exactly ``logits[..., y, x]``. Points within half a pixel of the
    border take the border value rather than blending with zeros.
    """
    height, width = logits.shape[-2:]
    y, x = points.unbind(dim=-1)
    grid = torch.stack([2 * x / width - 1, 2 * y / height - 1], dim=-1)  # grid_sample wants (x, y) in [-1, 1]
    sampled = nnF.grid_sample(
        logits, grid[:, None].to(logits.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled[:, :, 0]  # N, C, 1, P -> N, C, P


def sparse_cross_entropy(
    logits: torch.Tensor,
    points: torch.Tensor,
    point_labels: torch.Tensor,
    ignore_index: int,
    point_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over the labelled points of a batch, skipping labels equal to ``ignore_index``: the plain
    mean, or with ``point_weights`` (N, P) the weighted mean sum(w * ce) / sum(w).

    A batch with no usable point (all cropped out or void) gives a zero loss that still backpropagates, not NaN.
    """
    usable = point_labels != ignore_index
    if not usable.any():
        return logits.sum() * 0.0
    if point_weights is None:
        return nnF.cross_entropy(point_logits(logits, points), point_labels, ignore_index=ignore_index)
    losses = nnF.cross_entropy(point_logits(logits, points), point_labels, ignore_index=ignore_index, reduction="none")
    weights = point_weights * usable
    return (losses * weights).sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


# --- input checking ------------------------------------------------------------------------------------------------


def _to_tensors(
    image: np.ndarray, pixels: np.ndarray | None, pixel_labels: np.ndarray | None, mask: np.ndarray | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check the inputs and convert them: float 3xHxW image in [0, 1], pixel-centre points, long labels and mask."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise TransformInputError(f"image must be a uint8 HxWx3 array, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    image_t = F.to_dtype(torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1), torch.float32, scale=True)
    points, labels = _to_points(pixels, pixel_labels, height, width)
    mask_t = None
    if mask is not None:
        if mask.shape != (height, width):
            raise TransformInputError(f"mask shape {mask.shape} does not match the image's {(height, width)}")
        mask_t = torch.from_numpy(np.asarray(mask, dtype=np.int64))
    return image_t, points, labels, mask_t


def _to_points(
    pixels: np.ndarray | None, pixel_labels: np.ndarray | None, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if pixels is None and pixel_labels is None:
        return torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)
    if pixels is None or pixel_labels is None:
        raise TransformInputError("pixels and pixel_labels must be given together")
    pixels, pixel_labels = np.asarray(pixels), np.asarray(pixel_labels)
    if pixels.ndim != 2 or pixels.shape[1] != 2 or not np.issubdtype(pixels.dtype, np.integer):
        raise TransformInputError(f"pixels must be an integer (P, 2) array of (y, x), not {pixels.dtype}{pixels.shape}")
    if pixel_labels.shape != (len(pixels),):
        raise TransformInputError(f"pixel_labels shape {pixel_labels.shape} does not match {len(pixels)} pixels")
    outside = (pixels < 0).any(axis=1) | (pixels[:, 0] >= height) | (pixels[:, 1] >= width)
    if outside.any():
        y, x = pixels[outside][0]
        raise TransformInputError(f"pixel (y={y}, x={x}) is outside the {height}x{width} image")
    points = torch.from_numpy(pixels.astype(np.float32)) + 0.5
    return points, torch.from_numpy(pixel_labels.astype(np.int64))


def _to_weights(weights: np.ndarray | None, count: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(count)
    weights = np.asarray(weights, dtype=np.float32)
    if weights.shape != (count,) or not np.isfinite(weights).all() or (weights < 0).any():
        raise TransformInputError(f"pixel_weights must be {count} finite numbers >= 0, got shape {weights.shape}")
    return torch.from_numpy(weights)


def _stack_masks(masks: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(mask is None for mask in masks):
        return None
    if any(mask is None for mask in masks):
        raise TransformInputError("cannot batch samples where only some have a mask")
    return torch.stack(masks)


# --- geometry and colour -------------------------------------------------------------------------------------------


def _hflip(
    image: torch.Tensor, mask: torch.Tensor | None, points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    width = image.shape[-1]
    points = torch.stack([points[:, 0], width - points[:, 1]], dim=1)  # continuous x mirrors as w - x
    return F.horizontal_flip(image), None if mask is None else F.horizontal_flip(mask), points


def _photometric(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The paper's SimCLR-style colour augmentation, applied to a float image in [0, 1]."""
    if _coin(0.8, generator):
        image = _color_jitter(image, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, generator=generator)
    if _coin(0.2, generator):
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if _coin(0.5, generator):
        # The reference sizes the kernel from the crop; sizing it from the image actually blurred (smaller when
        # the crop overhangs it) keeps reflect padding valid, and with sigma <= 2 the tails beyond 3 sigma are nil.
        size = 2 * math.floor(0.05 * min(image.shape[-2:])) + 1
        sigma = _uniform(0.1, 2.0, generator)
        image = F.gaussian_blur(image, kernel_size=[size, size], sigma=[sigma, sigma])
    return image


def _color_jitter(
    image: torch.Tensor,
    *,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """torchvision's ColorJitter (factors uniform in [max(0, 1 - s), 1 + s], hue in [-h, h], adjustments in a
    random order), drawn from ``generator`` so that it is reproducible."""
    adjustments = [
        (F.adjust_brightness, _uniform(max(0.0, 1 - brightness), 1 + brightness, generator)),
        (F.adjust_contrast, _uniform(max(0.0, 1 - contrast), 1 + contrast, generator)),
        (F.adjust_saturation, _uniform(max(0.0, 1 - saturation), 1 + saturation, generator)),
        (F.adjust_hue, _uniform(-hue, hue, generator)),
    ]
    for index in torch.randperm(len(adjustments), generator=generator).tolist():
        adjust, factor = adjustments[index]
        image = adjust(image, factor)
    return image


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _coin(p: float, generator: torch.Generator | None) -> bool:
    return torch.rand((), generator=generator).item() < p


def _randint(high: int, generator: torch.Generator | None) -> int:
    """A uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=generator).item())
