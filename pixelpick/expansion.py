"""More supervision per click, derived at training time from the previous round's model, and how right it is.

Two ways to make a click label more than its own pixel, on top of superpixel expansion (`pixelpick.superpixels`):

- **Sieved superpixels** (`train.superpixel_sieve` = s > 0): a superpixel's expanded pixels where the previous
  round's model gives the click's class a probability below s are dropped. SLIC follows colour, and a superpixel
  that leaks across a boundary is where the previous model most often sees the other class.
- **Feature-space propagation** (`train.propagation_threshold` = t > 0): each click's class goes to the pixels of
  its own image whose embedding under the previous round's model has cosine similarity >= t with the click's
  (within `train.propagation_radius` pixels of it, when > 0). The embedding is the model's per-pixel class scores
  (log-probabilities centred over the classes: the logits up to a per-pixel shift), which every architecture has at
  the working resolution. A pixel reached by clicks of two classes is left alone; clicked pixels keep their own
  answer; a click's propagated pixels share the weight `train.propagation_weight`. Recomputed every round, from that
  round's previous model; round 0 has none, so it propagates nothing and sieves nothing.

`Expander.record` counts, for every expansion, how many expanded labels agree with the ground truth (simulated
campaigns have it): the precision of each kind of expansion is a per-round metric of the training step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

KINDS = ("superpixel", "propagation")
_EMPTY = (np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


def class_embedding(probs: np.ndarray) -> np.ndarray:
    """(C, H, W) probabilities -> (C, H * W) unit vectors: the centred log-probabilities of each pixel."""
    scores = np.log(probs.reshape(probs.shape[0], -1).astype(np.float32) + 1e-6)
    scores -= scores.mean(axis=0, keepdims=True)
    return scores / np.maximum(np.linalg.norm(scores, axis=0, keepdims=True), 1e-8)


def propagate_clicks(
    embedding: np.ndarray, shape: tuple[int, int], pixels: np.ndarray, classes: np.ndarray, ignore_index: int,
    threshold: float, radius: int = 0, weight: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels of one image that its clicks propagate to: ((M, 2) int64 (y, x), (M,) int64 classes, (M,) float32
    weights), row-major, never a clicked pixel. `embedding` is (D, H * W) unit vectors (`class_embedding`)."""
    known = classes != ignore_index
    if not known.any():
        return _EMPTY
    height, width = shape
    clicks, click_classes = pixels[known], classes[known]
    similarity = embedding[:, clicks[:, 0] * width + clicks[:, 1]].T @ embedding  # (K, H * W)
    if radius > 0:
        ys, xs = np.divmod(np.arange(height * width), width)
        far = (ys[None] - clicks[:, :1]) ** 2 + (xs[None] - clicks[:, 1:]) ** 2 > radius ** 2
        similarity[far] = -np.inf
    reached = similarity >= threshold
    classes_reaching = sum(reached[click_classes == c].any(axis=0).astype(np.int32) for c in np.unique(click_classes))
    chosen = classes_reaching == 1
    chosen[pixels[:, 0] * width + pixels[:, 1]] = False  # a clicked pixel keeps its own answer, void ones included
    where = np.flatnonzero(chosen)
    if not len(where):
        return _EMPTY
    owner = np.where(reached[:, where], similarity[:, where], -np.inf).argmax(axis=0)  # the most similar click
    share = weight / np.bincount(owner, minlength=len(clicks))[owner]
    ys, xs = np.divmod(where, width)
    return np.stack((ys, xs), axis=1).astype(np.int64), click_classes[owner].astype(np.int64), share.astype(np.float32)


class Expander:
    """The previous model's view of each training image, for the sieve and propagation, and precision counts.

    `teacher` (image id -> (C, H, W) probabilities at the working size) is None in round 0; `truth` (image id ->
    dense class map) is None when the pool has no ground truth (a human campaign), and then nothing is counted.
    """

    def __init__(
        self, ignore_index: int, *, teacher: Callable[[str], np.ndarray] | None = None, sieve: float = 0.0,
        propagation_threshold: float = 0.0, propagation_radius: int = 0, propagation_weight: float = 0.5,
        truth: Callable[[str], np.ndarray] | None = None,
    ) -> None:
        self.ignore_index, self.teacher, self.truth = ignore_index, teacher, truth
        self.sieve_below = sieve if teacher is not None else 0.0
        self.propagation = (propagation_threshold, propagation_radius, propagation_weight) \
            if teacher is not None and propagation_threshold > 0 else None
        self.counts = {kind: {"pixels": 0, "checked": 0, "correct": 0} for kind in KINDS}
        self.clicks = self.sieved = 0
        self._cached: tuple[str, np.ndarray] | None = None

    def _probs(self, image_id: str) -> np.ndarray:
        # The sieve and propagation of one image ask in turn: one forward pass serves both.
        if self._cached is None or self._cached[0] != image_id:
            self._cached = (image_id, self.teacher(image_id))
        return self._cached[1]

    def sieve(self, image_id: str, pixels: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Which expanded pixels to keep: those the previous model gives their class at least `sieve_below`."""
        if not self.sieve_below or not len(pixels):
            return np.ones(len(pixels), bool)
        keep = self._probs(image_id)[classes, pixels[:, 0], pixels[:, 1]] >= self.sieve_below
        self.sieved += int((~keep).sum())
        return keep

    def propagate(self, image_id: str, pixels: np.ndarray, classes: np.ndarray,
                  taken: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Propagated (pixels, classes, weights) of the clicks `pixels`, leaving out `taken` (already targets)."""
        if self.propagation is None:
            return _EMPTY
        probs = self._probs(image_id)
        extra, extra_classes, weights = propagate_clicks(class_embedding(probs), probs.shape[1:], pixels, classes,
                                                         self.ignore_index, *self.propagation)
        width = probs.shape[2]
        fresh = ~np.isin(extra[:, 0] * width + extra[:, 1], taken[:, 0] * width + taken[:, 1])
        return extra[fresh], extra_classes[fresh], weights[fresh]

    def record(self, kind: str, image_id: str, pixels: np.ndarray, classes: np.ndarray) -> None:
        counts = self.counts[kind]
        counts["pixels"] += len(pixels)
        if self.truth is not None and len(pixels):
            truth = self.truth(image_id)[pixels[:, 0], pixels[:, 1]]
            known = truth != self.ignore_index  # a void pixel has no right answer to compare with
            counts["checked"] += int(known.sum())
            counts["correct"] += int((truth[known] == classes[known]).sum())

    def summary(self) -> dict[str, Any]:
        """Per kind that expanded anything: expanded pixels per click and precision (None without ground truth);
        with a sieve, the share of superpixel expansion it dropped."""
        result: dict[str, Any] = {}
        for kind, counts in self.counts.items():
            if counts["pixels"]:
                result[f"{kind}_per_click"] = counts["pixels"] / max(self.clicks, 1)
                result[f"{kind}_precision"] = counts["correct"] / counts["checked"] if counts["checked"] else None
        if self.sieve_below:
            total = self.counts["superpixel"]["pixels"] + self.sieved
            result["superpixel_sieved_share"] = self.sieved / total if total else 0.0
        return result
