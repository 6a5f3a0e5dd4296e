"""Per-pixel class probabilities over the pool, streamed image by image, and written to the probability store."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from pixelpick.acquisition import score_pixels
from pixelpick.datasets.base import SegmentationDataset
from pixelpick.models import set_mc_dropout
from pixelpick.probstore import ProbabilityWriter
from pixelpick.transforms import EvalTransform


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    dataset: SegmentationDataset,
    image_ids: Sequence[str],
    device: torch.device,
    *,
    mc_samples: int = 0,
    batch_size: int = 8,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (image id, probabilities) per image: (C, H, W), or (T, C, H, W) for T = `mc_samples` >= 2 MC passes.

    Tensors are float32 on the CPU. Only one batch is ever held, so memory does not grow with the pool.
    """
    model.eval().to(device)
    set_mc_dropout(model, mc_samples >= 2)
    space = dataset.label_space
    transform = EvalTransform(mean=space.mean, std=space.std)
    passes = max(mc_samples, 1)
    try:
        for ids in same_size_batches(dataset, image_ids, batch_size):
            images = torch.stack([transform(dataset.load_image(i))["image"] for i in ids]).to(device)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            samples = []
            for _ in range(passes):
                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    logits = model(images)
                samples.append(logits.float().softmax(dim=1))
            probs = torch.stack(samples, dim=1).cpu()  # N, T, C, H, W
            for image_id, image_probs in zip(ids, probs):
                yield image_id, image_probs if passes > 1 else image_probs[0]
    finally:
        set_mc_dropout(model, False)


def infer_to_store(
    model: nn.Module,
    dataset: SegmentationDataset,
    store_path: str | Path,
    device: torch.device,
    *,
    strategy: str,
    mc_samples: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    dtype: str = "float16",
    progress: bool = False,
) -> Path:
    """Run the model over the whole pool and store each image's mean probabilities and `strategy` score map.

    Scores are computed here, from the live float32 probabilities, because MC strategies (BALD) need every pass
    and storing T x C x H x W per image is what makes uncertainty pipelines run out of memory.
    """
    generator = torch.Generator().manual_seed(seed)
    image_ids = list(dataset.image_ids)
    stream = predict_probabilities(model, dataset, image_ids, device, mc_samples=mc_samples, batch_size=batch_size)
    sizes = {image_id: dataset.image_size(image_id) for image_id in image_ids}
    with ProbabilityWriter(store_path, sizes, dataset.label_space.num_classes, strategy, dtype) as writer:
        for image_id, probs in tqdm(stream, total=len(image_ids), desc="infer", disable=not progress, leave=False):
            writer.write_computed(image_id, partial(_mean_and_scores, probs, strategy, generator))
    return Path(store_path)


def _mean_and_scores(probs: torch.Tensor, strategy: str, generator: torch.Generator) -> tuple:
    scores = score_pixels(strategy, probs, generator=generator)
    mean_probs = probs.mean(dim=0) if probs.dim() == 4 else probs
    return mean_probs.numpy(), scores.numpy()


def same_size_batches(
    dataset: SegmentationDataset, image_ids: Sequence[str], batch_size: int
) -> Iterator[list[str]]:
    """Batches of consecutive ids that share a size, so variable-size datasets (VOC) still batch."""
    batch: list[str] = []
    size = None
    for image_id in image_ids:
        image_size = dataset.image_size(image_id)
        if batch and (image_size != size or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(image_id)
        size = image_size
    if batch:
        yield batch
