"""The simulated annotator: answers pixel queries from the ground-truth masks, optionally with label noise and
shown the model's suggestions.

The suggestion model: a person shown the model's class for a pixel takes it without checking with probability
`suggestion_trust`, right or wrong; otherwise they answer on their own, as without suggestions (the ground truth,
wrong with probability `error_rate`). So a wrong suggestion becomes a wrong label with probability
`suggestion_trust`, and a right one saves them from their own error with that probability.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from pixelpick.errors import AnnotationError
from pixelpick.labels import label_frame

SIMULATED_TIME = pd.Timestamp(0, tz="UTC")


def simulate_annotations(
    queries: pd.DataFrame,
    masks: Callable[[str], np.ndarray],
    *,
    num_classes: int,
    ignore_index: int,
    round_id: int,
    error_rate: float = 0.0,
    generator: np.random.Generator,
    time: pd.Timestamp = SIMULATED_TIME,
    suggestions: np.ndarray | None = None,
    suggestion_trust: float = 0.0,
) -> pd.DataFrame:
    """Label every queried pixel with its ground-truth class, as a label batch for `LabelStore.append`.

    queries: columns image_id, y, x. masks: image id -> ground-truth mask (H, W).
    With probability `error_rate` a non-void answer is replaced by a uniformly drawn *other* class, to study
    annotator noise. Void ground truth is answered as void (`ignore_index`). Rows keep the order of `queries`.
    Simulated labels are stamped with a fixed `time` (they were made at no wall-clock time), so that re-running
    a round reproduces its label snapshot bit for bit.
    suggestions: the model's class per query row (-1 where none is shown); with probability `suggestion_trust` a
    suggested class is taken as it is (the model in this module's docstring). No trust draws no random numbers, so
    answers without suggestions are exactly those of before.
    """
    if not 0.0 <= error_rate <= 1.0:
        raise AnnotationError(f"error_rate must be in [0, 1], got {error_rate}")
    if not 0.0 <= suggestion_trust <= 1.0:
        raise AnnotationError(f"suggestion_trust must be in [0, 1], got {suggestion_trust}")
    if suggestions is not None and len(suggestions) != len(queries):
        raise AnnotationError(f"{len(suggestions)} suggestions for {len(queries)} queries; give one per query "
                              "(-1: none)")
    if error_rate > 0 and num_classes < 2:
        raise AnnotationError("a noisy annotator needs at least 2 classes to choose a wrong one from")
    truth = _ground_truth(queries, masks, num_classes=num_classes, ignore_index=ignore_index)

    # Draw for every row, void included, so the noise a pixel gets depends only on its position in the queries.
    n = len(truth)
    flip = generator.random(n) < error_rate
    shift = generator.integers(1, max(num_classes, 2), size=n)  # adding 1..C-1 (mod C) reaches every other class
    noisy = np.where(flip & (truth != ignore_index), (truth + shift) % num_classes, truth)
    if suggestions is not None and suggestion_trust > 0:
        suggested = np.asarray(suggestions, dtype=np.int64)
        trusted = (generator.random(n) < suggestion_trust) & (suggested >= 0)
        noisy = np.where(trusted, suggested, noisy)

    return label_frame(
        {
            "image_id": queries["image_id"].to_numpy(dtype=object),
            "y": queries["y"].to_numpy(),
            "x": queries["x"].to_numpy(),
            "class_id": noisy,
            "round": np.full(n, round_id),
            "source": ["simulated"] * n,
            "annotator": ["simulator"] * n,
            "seconds": np.zeros(n, dtype=np.float32),
            "time": [time] * n,
        }
    )


def _ground_truth(
    queries: pd.DataFrame, masks: Callable[[str], np.ndarray], *, num_classes: int, ignore_index: int
) -> np.ndarray:
    """The ground-truth class of every queried pixel, loading each image's mask once."""
    truth = np.empty(len(queries), dtype=np.int64)
    ys, xs = queries["y"].to_numpy(dtype=np.int64), queries["x"].to_numpy(dtype=np.int64)
    for image_id, rows in queries.groupby("image_id", sort=False).indices.items():
        mask = masks(image_id)
        height, width = mask.shape
        inside = (ys[rows] >= 0) & (ys[rows] < height) & (xs[rows] >= 0) & (xs[rows] < width)
        if not inside.all():
            y, x = ys[rows][~inside][0], xs[rows][~inside][0]
            raise AnnotationError(f"query (y={y}, x={x}) lies outside the {height}x{width} mask of {image_id!r}")
        truth[rows] = mask[ys[rows], xs[rows]]
    valid = ((truth >= 0) & (truth < num_classes)) | (truth == ignore_index)
    if not valid.all():
        row = queries.iloc[int(np.flatnonzero(~valid)[0])]
        raise AnnotationError(
            f"ground truth of {row['image_id']!r} at (y={row['y']}, x={row['x']}) is {truth[~valid][0]}, "
            f"neither a class in [0, {num_classes}) nor the void index {ignore_index}"
        )
    return truth
