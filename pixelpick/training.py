"""Training from sparse labelled pixels (or dense masks, for the fully supervised reference) and evaluation.

Reads top-down like torchvision's segmentation reference: datasets of labelled images, optimiser and schedule,
`train_one_epoch`, `evaluate`, and `fit`, which wires them together. Nothing here picks a "best epoch" on the
evaluation split (the reference did, protocol §7.9): a round's model is its last epoch's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pixelpick.datasets.base import SegmentationDataset
from pixelpick.inference import same_size_batches
from pixelpick.metrics import ConfusionMatrix
from pixelpick.settings import TrainSettings
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

    Each item's augmentation draws from its own generator seeded by (seed, epoch, index), so a run is
    reproducible whatever the number of loader workers.
    """

    def __init__(
        self,
        dataset: SegmentationDataset,
        transform: TrainTransform,
        labels: pd.DataFrame | None,
        seed: int = 0,
    ) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0
        if labels is None:
            self.image_ids = list(dataset.image_ids)
            self.pixels: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        else:
            trainable = labels[labels["class_id"] != dataset.label_space.ignore_index]
            groups = trainable.groupby("image_id", sort=True)
            self.pixels = {
                image_id: (rows[["y", "x"]].to_numpy(np.int64), rows["class_id"].to_numpy(np.int64))
                for image_id, rows in groups
            }
            self.image_ids = sorted(self.pixels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
        image = self.dataset.load_image(image_id)
        if self.pixels is None:
            return self.transform(image, mask=self.dataset.load_mask(image_id), generator=generator)
        pixels, classes = self.pixels[image_id]
        return self.transform(image, pixels=pixels, pixel_labels=classes, generator=generator)


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
) -> dict[str, float]:
    model.train()
    total_loss, batches = 0.0, 0
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = model(images)
        logits = logits.float()
        if batch["mask"] is not None:
            loss = F.cross_entropy(logits, batch["mask"].to(device), ignore_index=ignore_index)
        else:
            loss = sparse_cross_entropy(
                logits, batch["points"].to(device), batch["point_labels"].to(device), ignore_index
            )
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
) -> dict:
    """mIoU, per-class IoU and pixel accuracy from one confusion matrix over the whole split."""
    model.eval()
    space = dataset.label_space
    matrix = ConfusionMatrix(space.num_classes)
    transform = EvalTransform(mean=space.mean, std=space.std)
    for ids in tqdm(same_size_batches(dataset, dataset.image_ids, batch_size), desc="evaluate", disable=not progress, leave=False):
        images = torch.stack([transform(dataset.load_image(i))["image"] for i in ids]).to(device)
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


def fit(
    model: nn.Module,
    dataset: SegmentationDataset,
    labels: pd.DataFrame | None,
    settings: TrainSettings,
    device: torch.device,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = False,
) -> FitResult:
    """Train `model` on the labelled pixels in `labels` (dense masks when None) for `settings.epochs` epochs."""
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
    train_set = LabelledImages(dataset, transform, labels, seed=settings.seed)
    if len(train_set) == 0:
        raise ValueError("no labelled pixels to train on: the label snapshot is empty")
    loader = DataLoader(
        train_set,
        batch_size=settings.batch_size,
        shuffle=True,
        num_workers=settings.num_workers,
        collate_fn=partial(collate_sparse, ignore_index=space.ignore_index),
        generator=torch.Generator().manual_seed(settings.seed),
        drop_last=len(train_set) % settings.batch_size == 1,  # a batch of one breaks BatchNorm
        pin_memory=device.type == "cuda",
        persistent_workers=settings.num_workers > 0,
    )
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, settings)
    iters_per_epoch = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(settings, it, iters_per_epoch)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    result = FitResult()
    started = time.perf_counter()
    for epoch in tqdm(range(settings.epochs), desc="train", disable=not progress, leave=False):
        train_set.set_epoch(epoch)
        metrics = train_one_epoch(model, loader, optimizer, scheduler, device, space.ignore_index, scaler)
        metrics["epoch"] = epoch
        result.history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        log.debug("epoch %d: %s", epoch, metrics)
    result.seconds_per_epoch = (time.perf_counter() - started) / settings.epochs
    return result
