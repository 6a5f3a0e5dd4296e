"""Training from sparse labelled pixels (or dense masks, for the fully supervised reference) and evaluation.

Reads top-down like torchvision's segmentation reference: datasets of labelled images, optimiser and schedule,
`train_one_epoch`, `evaluate`, and `fit`, which wires them together. Nothing here picks a "best epoch" on the
evaluation split (the reference code did): a round's model is its last epoch's.
"""

from __future__ import annotations

import io
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from pixelpick.datasets.base import SegmentationDataset
from pixelpick.distributed import rank_and_size
from pixelpick.expansion import Expander
from pixelpick.inference import predict_batches, same_size_batches
from pixelpick.io import atomic_write
from pixelpick.metrics import ConfusionMatrix
from pixelpick.settings import TrainSettings
from pixelpick.superpixels import expand_clicks
from pixelpick.transforms import EvalTransform, TrainTransform, collate_sparse, sparse_cross_entropy

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` takes the GPU when there is one, so the same settings run anywhere."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


class LabelledImages(Dataset):
    """The training images with their supervision: sparse labelled pixels, or the dense mask when `labels` is None.

    Optional training-time extras, never stored with the labels:
    - `superpixels` (image id -> segment map): each click's class spreads over its superpixel
      (`pixelpick.superpixels.expand_clicks`); the expanded pixels of one superpixel share the weight
      `expansion_weight` (a click weighs 1), so a large region adds context without drowning the clicks;
    - `pseudo_labels` (image id -> class map, `ignore_index` where there is none): a dense map of extra targets,
      returned as the sample's `pseudo_mask`;
    - `expander` (`pixelpick.expansion.Expander`): sieves the superpixel expansion, adds feature-space propagation
      from the previous model, and counts how many expanded labels the ground truth agrees with.

    Each item's augmentation draws from its own generator seeded by (seed, epoch, index), so a run is
    reproducible whatever the number of loader workers. Decoded images are kept in memory (up to
    `cache_bytes`), since decoding and resizing them again every epoch costs a fifth of a small model's epoch.
    """

    def __init__(
        self,
        dataset: SegmentationDataset,
        transform: TrainTransform,
        labels: pd.DataFrame | None,
        seed: int = 0,
        *,
        superpixels: Callable[[str], np.ndarray] | None = None,
        expansion_weight: float = 0.5,
        pseudo_labels: Mapping[str, np.ndarray] | None = None,
        cache_bytes: int = 1 << 30,
        expander: Expander | None = None,
    ) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0
        self.pseudo_labels = pseudo_labels
        self._images: dict[str, np.ndarray] = {}
        self._cache_left = cache_bytes
        self.weighted = superpixels is not None or (expander is not None and expander.propagation is not None)
        if labels is None:
            self.image_ids = list(dataset.image_ids)
            self.pixels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
            return
        ignore = dataset.label_space.ignore_index
        self.pixels = {}
        for image_id, rows in labels.groupby("image_id", sort=True):
            pixels, classes = rows[["y", "x"]].to_numpy(np.int64), rows["class_id"].to_numpy(np.int64)
            weights = np.ones(len(pixels), np.float32)
            clicks, click_classes = pixels, classes
            if expander is not None:
                expander.clicks += int((classes != ignore).sum())
            if superpixels is not None:
                segments = superpixels(image_id)
                extra, extra_classes = expand_clicks(segments, pixels, classes, ignore)
                if expander is not None:
                    keep = expander.sieve(image_id, extra, extra_classes)
                    extra, extra_classes = extra[keep], extra_classes[keep]
                    expander.record("superpixel", image_id, extra, extra_classes)
                region = segments[extra[:, 0], extra[:, 1]]
                share = expansion_weight / np.bincount(region)[region]  # a region's pixels share its weight
                pixels, classes = np.concatenate([pixels, extra]), np.concatenate([classes, extra_classes])
                weights = np.concatenate([weights, share.astype(np.float32)])
            if expander is not None and expander.propagation is not None:
                extra, extra_classes, share = expander.propagate(image_id, clicks, click_classes, taken=pixels)
                expander.record("propagation", image_id, extra, extra_classes)
                pixels, classes = np.concatenate([pixels, extra]), np.concatenate([classes, extra_classes])
                weights = np.concatenate([weights, share])
            trainable = classes != ignore
            if trainable.any():
                self.pixels[image_id] = (pixels[trainable], classes[trainable], weights[trainable])
        self.image_ids = sorted(self.pixels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def _image(self, image_id: str) -> np.ndarray:
        if image_id in self._images:
            return self._images[image_id]
        image = self.dataset.load_image(image_id)
        if image.nbytes <= self._cache_left:
            self._images[image_id] = image
            self._cache_left -= image.nbytes
        return image

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
        image = self._image(image_id)
        if self.pixels is None:
            return self.transform(image, mask=self.dataset.load_mask(image_id), generator=generator)
        pixels, classes, weights = self.pixels[image_id]
        pseudo = None if self.pseudo_labels is None else self.pseudo_labels[image_id]
        sample = self.transform(image, pixels=pixels, pixel_labels=classes, pixel_weights=weights, mask=pseudo,
                                generator=generator)
        sample["pseudo_mask"] = sample.pop("mask")
        sample["mask"] = None
        return sample


def build_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """Two parameter groups, as in the paper: a smaller lr for the backbone than for the head."""
    backbone, head = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if "backbone" in name.split(".") else head).append(param)
    groups = [
        {"params": backbone, "lr": settings.lr_backbone},
        {"params": head, "lr": settings.lr_head},
    ]
    if settings.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=settings.weight_decay)
    return torch.optim.SGD(groups, momentum=settings.momentum, weight_decay=settings.weight_decay)


def lr_factor(settings: TrainSettings, iteration: int, iters_per_epoch: int) -> float:
    """Multiplier of the base lr at a global iteration (0-based); stepped every iteration."""
    total = settings.epochs * iters_per_epoch
    if settings.schedule == "poly":
        return (1 - min(iteration, total - 1) / total) ** 0.9
    if settings.schedule == "multistep":
        epoch = iteration // iters_per_epoch
        return settings.gamma ** sum(epoch >= milestone for milestone in settings.milestones)
    return 1.0


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    ignore_index: int,
    scaler: torch.amp.GradScaler,
    *,
    weighted: bool = False,
    pseudo_weight: float = 0.0,
) -> dict[str, float]:
    """One pass over `loader`. The loss is cross-entropy on the dense masks, or on the labelled points (their
    weighted mean when `weighted`), plus `pseudo_weight` times the cross-entropy on the batch's pseudo-labels."""
    model.train()
    total_loss, batches = 0.0, 0
    for batch in loader:
        # Channels-last is faster on both the CPU (oneDNN) and the GPU for these convolutional models.
        images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = model(images)
        logits = logits.float()
        if batch["mask"] is not None:
            loss = F.cross_entropy(logits, batch["mask"].to(device), ignore_index=ignore_index)
        else:
            weights = batch["point_weights"].to(device) if weighted else None
            loss = sparse_cross_entropy(
                logits, batch["points"].to(device), batch["point_labels"].to(device), ignore_index, weights
            )
        pseudo = batch.get("pseudo_mask")
        if pseudo_weight > 0 and pseudo is not None and (pseudo != ignore_index).any():
            loss = loss + pseudo_weight * F.cross_entropy(logits, pseudo.to(device), ignore_index=ignore_index)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_loss += loss.item()
        batches += 1
    return {"loss": total_loss / max(batches, 1), "lr_head": optimizer.param_groups[-1]["lr"]}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: SegmentationDataset,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = False,
    image_ids: list[str] | None = None,
) -> dict:
    """mIoU, per-class IoU and pixel accuracy from one confusion matrix over the split (or its `image_ids`)."""
    model.eval().to(device).to(memory_format=torch.channels_last)
    space = dataset.label_space
    matrix = ConfusionMatrix(space.num_classes)
    transform = EvalTransform(mean=space.mean, std=space.std)
    batches = same_size_batches(dataset, dataset.image_ids if image_ids is None else image_ids, batch_size)
    for ids in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        images = torch.stack([transform(dataset.load_image(i))["image"] for i in ids]).to(device)
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            predictions = model(images).argmax(1).cpu()
        for image_id, prediction in zip(ids, predictions):
            matrix.update(prediction, torch.from_numpy(dataset.load_mask(image_id)))
    result = matrix.compute()
    result["class_names"] = [c.name for c in space.classes]
    return result


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    seconds_per_epoch: float = math.nan
    resumed_from_epoch: int = 0  # epochs a resume point had already trained
    expansion: dict[str, float | None] = field(default_factory=dict)  # `Expander.summary`: per click, precision


@dataclass(frozen=True)
class ResumePoint:
    """Where `fit` keeps its state every `every` epochs, so that a run killed mid-training continues where it
    stopped and ends with the same weights. `key` names what is being trained: a file saved for anything else
    (another snapshot, other settings) is ignored."""

    path: Path
    key: str
    every: int = 5

    def load(self) -> dict | None:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except (FileNotFoundError, RuntimeError, EOFError, OSError, ValueError):
            return None
        return state if isinstance(state, dict) and state.get("key") == self.key else None

    def save(self, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save({**state, "key": self.key}, buffer)
        atomic_write(self.path, lambda f: f.write(buffer.getvalue()))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def fit(
    model: nn.Module,
    dataset: SegmentationDataset,
    labels: pd.DataFrame | None,
    settings: TrainSettings,
    device: torch.device,
    *,
    seed: int = 0,
    superpixels: Callable[[str], np.ndarray] | None = None,
    pseudo_labels: Mapping[str, np.ndarray] | None = None,
    resume: ResumePoint | None = None,
    expander: Expander | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = False,
) -> FitResult:
    """Train `model` on the labelled pixels in `labels` (dense masks when None) for `settings.epochs` epochs, the
    epochs of this one training (the train step passes the round's: `train.initial_epochs` in round 0); `seed`
    fixes the shuffling and every augmentation. With `resume`, training continues from the state saved there, if
    any, and saves its state every few epochs (the result is the same as an uninterrupted run).

    `superpixels` (image id -> segment map) turns on superpixel expansion, weighted `settings.superpixel_weight`;
    `pseudo_labels` (image id -> class map) adds self-training targets weighted `settings.self_training_weight`.
    """
    space = dataset.label_space
    crop_size = settings.crop_size or dataset.image_size(dataset.image_ids[0])
    transform = TrainTransform(
        crop_size=crop_size,
        scale_range=settings.scale_range,
        hflip_p=settings.hflip_p,
        photometric=settings.photometric,
        mean=space.mean,
        std=space.std,
        ignore_index=space.ignore_index,
    )
    train_set = LabelledImages(dataset, transform, labels, seed=seed, superpixels=superpixels,
                               expansion_weight=settings.superpixel_weight, pseudo_labels=pseudo_labels,
                               expander=expander)
    if len(train_set) == 0:
        raise ValueError("no labelled pixels to train on: the label snapshot is empty")
    rank, processes = rank_and_size()
    batch_size = max(1, settings.batch_size // processes)  # the global batch stays the configured one
    # In a process group each process takes its share of one seeded permutation of the images per epoch.
    sampler = DistributedSampler(train_set, num_replicas=processes, rank=rank, shuffle=True, seed=seed) \
        if processes > 1 else None
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=settings.num_workers,
        collate_fn=partial(collate_sparse, ignore_index=space.ignore_index),
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(train_set) % settings.batch_size == 1,  # a batch of one breaks BatchNorm
        pin_memory=device.type == "cuda",
        persistent_workers=settings.num_workers > 0,
    )
    model.to(device).to(memory_format=torch.channels_last)
    trained = _data_parallel(model, device) if processes > 1 else model
    optimizer = build_optimizer(model, settings)
    iters_per_epoch = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(settings, it, iters_per_epoch)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    result = FitResult(expansion=expander.summary() if expander is not None else {})
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    saved = resume.load() if resume is not None else None
    if saved is not None:
        for name, part in parts.items():
            part.load_state_dict(saved[name])
        loader.generator.set_state(saved["shuffle_rng"])
        torch.set_rng_state(saved["torch_rng"])  # dropout draws from the global generator
        # Interned keys, as a run that was never interrupted has them: pickled checkpoints then match byte for byte.
        result.history = [{sys.intern(key): value for key, value in epoch.items()} for epoch in saved["history"]]
        result.resumed_from_epoch = saved["epoch"] + 1
        log.info("training resumes after epoch %d of %d", saved["epoch"] + 1, settings.epochs)
    started = time.perf_counter()
    for epoch in tqdm(range(result.resumed_from_epoch, settings.epochs), desc="train", disable=not progress,
                      leave=False):
        train_set.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        metrics = train_one_epoch(trained, loader, optimizer, scheduler, device, space.ignore_index, scaler,
                                  weighted=train_set.weighted,
                                  pseudo_weight=settings.self_training_weight if pseudo_labels else 0.0)
        metrics["epoch"] = epoch
        result.history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        log.debug("epoch %d: %s", epoch, metrics)
        if resume is not None and rank == 0 and (epoch + 1) % resume.every == 0 and epoch + 1 < settings.epochs:
            resume.save({**{name: part.state_dict() for name, part in parts.items()}, "epoch": epoch,
                         "shuffle_rng": loader.generator.get_state(), "torch_rng": torch.get_rng_state(),
                         "history": result.history})
    trained = settings.epochs - result.resumed_from_epoch
    result.seconds_per_epoch = (time.perf_counter() - started) / trained if trained else math.nan
    if resume is not None and rank == 0:
        resume.clear()
    return result


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` under DDP, its BatchNorm synchronised across processes where torch supports it (GPUs)."""
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@torch.no_grad()
def predict_pseudo_labels(
    model: nn.Module,
    dataset: SegmentationDataset,
    image_ids: list[str],
    labels: pd.DataFrame,
    threshold: float,
    device: torch.device,
    batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """Self-training targets: `model`'s class where its probability is at least `threshold`, elsewhere (and on
    every pixel with a label of its own) the dataset's ignore index. Returns image id -> (H, W) int16 class map."""
    ignore = dataset.label_space.ignore_index
    labelled = {image_id: rows[["y", "x"]].to_numpy() for image_id, rows in labels.groupby("image_id")}
    targets = {}
    for ids, probs in predict_batches(model, dataset, image_ids, device, batch_size=batch_size):
        confidence, classes = probs.max(dim=1)
        maps = torch.where(confidence >= threshold, classes, ignore).to(torch.int16).numpy()
        for image_id, target in zip(ids, maps):
            if image_id in labelled:
                ys, xs = labelled[image_id].T
                target[ys, xs] = ignore
            targets[image_id] = target
    return targets
