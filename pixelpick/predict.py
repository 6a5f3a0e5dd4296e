"""Prediction with a trained checkpoint: class probabilities and label maps for RGB images of any size.

Images are resized to the size the model was trained at (when it had one), predicted, and the probabilities
resized back, so the label map always matches the input image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from pixelpick.checkpoints import label_space_from_record, model_from_checkpoint, read_checkpoint
from pixelpick.errors import PredictionInputError
from pixelpick.transforms import EvalTransform


class Predictor:
    """A checkpoint ready to predict. `predict(images)` takes uint8 RGB (N, H, W, 3) or one (H, W, 3) image."""

    def __init__(self, checkpoint: dict[str, Any] | str | Path, device: str = "cpu") -> None:
        if not isinstance(checkpoint, dict):
            checkpoint = read_checkpoint(Path(checkpoint))
        self.model = model_from_checkpoint(checkpoint).to(device)
        self.label_space = label_space_from_record(checkpoint["label_space"])
        self.image_size = tuple(checkpoint["image_size"]) if checkpoint.get("image_size") else None
        self.device = torch.device(device)
        self.transform = EvalTransform(mean=self.label_space.mean, std=self.label_space.std)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """{"probabilities": float32 (N, C, H, W), "labels": int64 (N, H, W)} at the input images' size."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise PredictionInputError(f"expected uint8 RGB images of shape (N, H, W, 3), got {images.dtype} "
                                       f"{images.shape}")
        height, width = images.shape[1:3]
        batch = torch.stack([self.transform(image)["image"] for image in images]).to(self.device)
        if self.image_size and (height, width) != self.image_size:
            batch = F.interpolate(batch, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        probabilities = self.model(batch.contiguous(memory_format=torch.channels_last)).float().softmax(dim=1)
        if probabilities.shape[-2:] != (height, width):
            probabilities = F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=False)
        probabilities = probabilities.cpu()
        return {"probabilities": probabilities.numpy(), "labels": probabilities.argmax(dim=1).numpy()}


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as error:  # PIL raises many types for a bad file
        raise PredictionInputError(f"cannot read image {path}: {error}") from error


def save_label_map(labels: np.ndarray, colours: list[tuple[int, int, int]], path: Path) -> Path:
    """A palette PNG: pixel values are class ids, shown in the classes' colours."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette([channel for colour in colours for channel in colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
