"""Per-pixel class probabilities over the pool, streamed batch by batch, and written to the probability store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pixelpick.acquisition import score_batch
from pixelpick.datasets.base import SegmentationDataset
from pixelpick.models import set_mc_dropout
from pixelpick.probstore import ProbabilityWriter
from pixelpick.transforms import EvalTransform


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    dataset: SegmentationDataset,
    image_ids: Sequence[str],
    device: torch.device,
    *,
    mc_samples: int = 0,
    batch_size: int = 8,
    before_forward: Callable[[], None] | None = None,
    batches: Sequence[tuple[int, list[str]]] | None = None,
    seed: int | None = None,
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yield (image ids, probabilities) per batch: (N, C, H, W), or (N, T, C, H, W) for T = `mc_samples` >= 2.

    Tensors are float32 on the CPU. Only one batch is ever held, so memory does not grow with the pool.
    `before_forward`, if given, is called after a batch's images are loaded and before its forward pass.
    `batches` ((index in the pool's batches, image ids), ...) replaces `image_ids` and `batch_size`; with `seed`,
    each batch's MC-dropout masks are drawn from (seed, its index), so a shard of the pool draws what the whole
    pool would.
    """
    if batches is None:
        batches = list(enumerate(same_size_batches(dataset, image_ids, batch_size)))
    model.eval().to(device).to(memory_format=torch.channels_last)
    set_mc_dropout(model, mc_samples >= 2)
    space = dataset.label_space
    transform = EvalTransform(mean=space.mean, std=space.std)
    passes = max(mc_samples, 1)
    try:
        for index, ids in batches:
            images = torch.stack([transform(dataset.load_image(i))["image"] for i in ids]).to(device)
            images = images.contiguous(memory_format=torch.channels_last)  # faster on the CPU and the GPU alike
            if before_forward is not None:
                before_forward()
            if passes > 1 and seed is not None:
                torch.manual_seed(seed * 1_000_003 + index)
            samples = []
            for _ in range(passes):
                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    logits = model(images)
                samples.append(logits.float().softmax(dim=1))
            probs = samples[0] if passes == 1 else torch.stack(samples, dim=1)  # N, [T,] C, H, W
            yield ids, probs.cpu()
    finally:
        set_mc_dropout(model, False)


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
    for ids, probs in predict_batches(
        model, dataset, image_ids, device, mc_samples=mc_samples, batch_size=batch_size
    ):
        yield from zip(ids, probs)


@dataclass
class InferenceTimings:
    """What `infer_to_store` spent its time on, in seconds. Scoring and writes run on the writer thread and
    overlap the forward passes, so they need not add up to `seconds`."""

    seconds: float = 0.0  # wall time of the whole inference into the store
    scoring_seconds: float = 0.0  # computing acquisition scores
    write_seconds: float = 0.0  # writing the store: compression and chunk files
    images: int = 0


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
    key: str | None = None,
    progress: bool = False,
    timings: InferenceTimings | None = None,
    batches: Sequence[tuple[int, list[str]]] | None = None,
) -> str | Path:
    """Run the model over the pool and store each image's mean probabilities and `strategy` score map.

    Scores are computed here, from the live float32 probabilities, because MC strategies (BALD) need every pass
    and storing T x C x H x W per image is what makes uncertainty pipelines run out of memory. Each batch is scored
    at once and written on the store's writer thread while the next batch runs through the model. Pass `timings`
    to have it filled in. `key` is recorded in the store, to tell later what it was computed from.

    Without `batches` this creates the store at `store_path` (a path or an fsspec URL), fills it and marks it
    complete. With `batches` ((index in the pool's batches, image ids), ...: one shard, see `pool_batches`), it
    writes those images into a store `create_store` made, and the caller marks it complete once all shards are in.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    shard = batches is not None
    if batches is None:
        batches = list(enumerate(same_size_batches(dataset, dataset.image_ids, batch_size)))
    image_ids = [image_id for _, ids in batches for image_id in ids]
    sizes = {image_id: dataset.image_size(image_id) for image_id in image_ids}
    scoring_seconds = 0.0

    def scored(probs: torch.Tensor, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The batch's stored probabilities and its (N, H, W) scores; runs on the writer thread."""
        nonlocal scoring_seconds
        scoring_start = time.perf_counter()
        scores = score_batch(strategy, probs, generator=generator)
        scoring_seconds += time.perf_counter() - scoring_start
        return stored, scores

    writer = (ProbabilityWriter(store_path, images=image_ids) if shard else
              ProbabilityWriter(store_path, sizes, dataset.label_space.num_classes, strategy, dtype, key=key))
    with writer:
        # On the CPU the forward pass already keeps every core busy, and a writer thread running beside it stalls
        # torch's thread team at each op; so the previous batch is scored and written while this batch's images
        # load (single-threaded), and finished before the forward pass starts.
        stream = predict_batches(model, dataset, image_ids, device, mc_samples=mc_samples, batches=batches,
                                 seed=seed, before_forward=writer.drain if device.type == "cpu" else None)
        with tqdm(total=len(image_ids), desc="infer", disable=not progress, leave=False) as bar:
            for ids, probs in stream:
                # Mean over MC passes and the store's dtype here: torch converts to float16 far faster than numpy.
                stored = (probs.mean(dim=1) if probs.dim() == 5 else probs).to(getattr(torch, dtype))
                stored = pad_classes(stored, dataset.label_space.num_classes).numpy()
                writer.write_computed_batch(ids, partial(scored, probs, stored))
                bar.update(len(ids))
    if timings is not None:
        timings.seconds = time.perf_counter() - start
        timings.scoring_seconds = scoring_seconds
        timings.write_seconds = writer.write_seconds
        timings.images = len(image_ids)
    return store_path


def pad_classes(probs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C, H, W) probabilities of a model trained before classes were appended, as (N, num_classes, H, W) with
    probability 0 for the classes it never saw: the store holds the current label space, while the scores come
    from what the model can predict (the zeros change no entropy, margin or class-balanced weight)."""
    missing = num_classes - probs.shape[1]
    if missing < 0:
        raise ValueError(f"the model predicts {probs.shape[1]} classes, more than the label space's {num_classes}")
    if missing == 0:
        return probs
    return torch.cat([probs, probs.new_zeros((probs.shape[0], missing, *probs.shape[2:]))], dim=1)


def pool_batches(dataset: SegmentationDataset, batch_size: int) -> list[tuple[int, list[str]]]:
    """The pool's batches as (index, image ids): shards made of whole batches infer exactly what the pool does."""
    return list(enumerate(same_size_batches(dataset, dataset.image_ids, batch_size)))


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
