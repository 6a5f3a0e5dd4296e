"""ConfusionMatrix against hand-computed matrices."""

import math

import numpy as np
import pytest
import torch

from pixelpick.metrics import ConfusionMatrix

VOID = 255


def test_two_classes_by_hand():
    # GT 0: one right, one called 1. GT 1: two right, one called 0.
    metric = ConfusionMatrix(2)
    metric.update(torch.tensor([0, 1, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 1]))
    result = metric.compute()
    assert result["confusion"] == [[1, 1], [1, 2]]
    assert result["iou_per_class"] == pytest.approx([1 / 3, 2 / 4])  # TP / (GT + Pred - TP)
    assert result["miou"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert result["pixel_accuracy"] == pytest.approx(3 / 5)
    assert result["mean_class_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_three_classes_with_one_absent_from_both_and_void_targets():
    target = np.array([[0, 1, 1], [0, VOID, VOID]])
    pred = np.array([[0, 1, 0], [0, 2, 1]])  # class 2 is only predicted on void pixels, which do not count
    metric = ConfusionMatrix(3)
    metric.update(pred, target)
    result = metric.compute()
    assert result["confusion"] == [[2, 0, 0], [1, 1, 0], [0, 0, 0]]
    iou = result["iou_per_class"]
    assert iou[:2] == pytest.approx([2 / 3, 1 / 2]) and math.isnan(iou[2])
    assert result["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # the absent class is skipped, not counted as 0
    assert result["pixel_accuracy"] == pytest.approx(3 / 4)
    assert result["mean_class_accuracy"] == pytest.approx((1 + 1 / 2) / 2)


def test_a_class_predicted_but_absent_from_the_truth_scores_zero():
    metric = ConfusionMatrix(3)
    metric.update(np.array([0, 0, 2]), np.array([0, 0, 0]))
    result = metric.compute()
    assert result["iou_per_class"][0] == pytest.approx(2 / 3)
    assert math.isnan(result["iou_per_class"][1]) and result["iou_per_class"][2] == 0
    assert result["miou"] == pytest.approx((2 / 3 + 0) / 2)


def test_targets_outside_the_classes_are_ignored():
    metric = ConfusionMatrix(2)
    metric.update(np.array([1, 0, 1, 1]), np.array([VOID, -1, 2, 1]))
    assert metric.compute()["confusion"] == [[0, 0], [0, 1]]


def test_two_updates_equal_one_update_over_the_concatenation():
    generator = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (2, 6, 7), generator=generator)
    target = torch.randint(0, 5, (2, 6, 7), generator=generator)  # 4 plays void
    target[target == 4] = VOID
    split, whole = ConfusionMatrix(4), ConfusionMatrix(4)
    split.update(pred[0], target[0])
    split.update(pred[1], target[1])
    whole.update(pred, target)
    assert split.compute()["confusion"] == whole.compute()["confusion"]
    assert split.compute()["miou"] == whole.compute()["miou"]
    assert sum(map(sum, whole.compute()["confusion"])) == int((target != VOID).sum())


def test_nothing_scored_gives_nan():
    result = ConfusionMatrix(2).compute()
    assert math.isnan(result["miou"]) and math.isnan(result["pixel_accuracy"])


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (np.zeros(3, dtype=int), np.zeros(4, dtype=int), "shape"),
        (np.zeros(3), np.zeros(3, dtype=int), "integer"),
        (np.array([0, 2, 1]), np.zeros(3, dtype=int), r"\[0, 2\)"),
    ],
)
def test_bad_input_is_rejected(pred, target, message):
    with pytest.raises(ValueError, match=message):
        ConfusionMatrix(2).update(pred, target)
