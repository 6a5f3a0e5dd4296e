"""Segmentation metrics from one confusion matrix accumulated over a whole split."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class ConfusionMatrix:
    """Counts (ground truth, prediction) pairs; rows are ground truth, columns predictions.

    Targets outside [0, num_classes) (void, padding) are dropped, so they never count.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Add a batch of predicted and ground-truth class maps of the same shape."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must be integer class maps (take the argmax of the logits first)")
        n = self.num_classes
        scored = (target >= 0) & (target < n)
        pred, target = pred[scored].long(), target[scored].long()
        if len(pred) and (pred.min() < 0 or pred.max() >= n):
            raise ValueError(f"predictions must be classes in [0, {n}), got values in [{pred.min()}, {pred.max()}]")
        counts = torch.bincount(target * n + pred, minlength=n * n)
        self.matrix += counts.reshape(n, n).cpu()

    def compute(self) -> dict:
        """mIoU, per-class IoU, pixel accuracy, mean class accuracy and the matrix itself.

        IoU_c = TP / (GT_c + Pred_c - TP). A class absent from both ground truth and predictions has IoU NaN and
        is left out of the mean, as are classes absent from the ground truth in the mean class accuracy.
        """
        matrix = self.matrix.double()
        true_positives = matrix.diag()
        in_truth, in_pred = matrix.sum(dim=1), matrix.sum(dim=0)
        iou = true_positives / (in_truth + in_pred - true_positives)  # 0 / 0 = NaN
        class_accuracy = true_positives / in_truth
        return {
            "miou": torch.nanmean(iou).item(),
            "iou_per_class": iou.tolist(),
            "pixel_accuracy": (true_positives.sum() / matrix.sum()).item(),
            "mean_class_accuracy": torch.nanmean(class_accuracy).item(),
            "confusion": self.matrix.tolist(),
        }
