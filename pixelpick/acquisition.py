"""Acquisition: which pixels to ask the annotator about next.

Two pure steps. `score_pixels` turns class probabilities into an (H, W) map where **higher always means more
informative**, so selection never branches on the strategy. `select_pixels` applies PixelPick's diversity rule:
take the most informative few percent of the still-unlabelled pixels and draw the budget uniformly among them.

Every strategy in `ACQUISITIONS` has one signature, `(probs[T, C, H, W], generator) -> scores[H, W]`: T is the
number of forward passes (1 for a deterministic model, more for MC dropout). Running the passes is the caller's job.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from pixelpick.errors import AcquisitionError

Acquisition = Callable[[Tensor, torch.Generator | None], Tensor]

# Softmax outputs sum to 1 up to float rounding; anything further off is not a probability vector.
_SUM_TOLERANCE = 1e-3


def _mean_over_passes(per_pass: Callable[[Tensor], Tensor]) -> Acquisition:
    """Lift a per-pass score (T, C, H, W) -> (T, H, W) to the mean score over the T passes.

    With MC dropout the reference meant to average the per-pass uncertainty maps, not to score the mean probability.
    """

    def score(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return per_pass(probs).mean(dim=0)

    score.__name__ = per_pass.__name__
    score.__doc__ = per_pass.__doc__
    return score


@_mean_over_passes
def margin(probs: Tensor) -> Tensor:
    """1 - (p_top1 - p_top2): close to 1 where the two most likely classes tie."""
    top2 = probs.topk(2, dim=1).values  # (T, 2, H, W)
    return 1 - (top2[:, 0] - top2[:, 1])


@_mean_over_passes
def entropy(probs: Tensor) -> Tensor:
    """-sum_c p_c ln p_c; xlogy makes 0 ln 0 = 0, so a zero probability cannot produce NaN."""
    return -torch.special.xlogy(probs, probs).sum(dim=1)  # (T, H, W)


@_mean_over_passes
def least_confidence(probs: Tensor) -> Tensor:
    """1 - max_c p_c."""
    return 1 - probs.amax(dim=1)  # (T, H, W)


def random(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform noise: the random-sampling baseline. Needs a generator so a campaign is reproducible."""
    if generator is None:
        raise AcquisitionError("the 'random' strategy needs a torch.Generator (pass generator=...)")
    _, _, height, width = probs.shape
    return torch.rand((height, width), generator=generator, device=generator.device).to(probs.device)


def bald(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mutual information between prediction and weights: H(mean_t p_t) - mean_t H(p_t). Needs T > 1 MC passes."""
    if probs.shape[0] < 2:
        raise AcquisitionError(
            f"'bald' measures disagreement between MC-dropout passes and needs probs of shape (T, C, H, W) "
            f"with T > 1, got T = {probs.shape[0]}"
        )
    entropy_of_mean = entropy(probs.mean(dim=0, keepdim=True))  # (H, W)
    mean_entropy = entropy(probs)  # (H, W), already averaged over passes
    # Mutual information is non-negative; clamp away float rounding when all passes agree.
    return (entropy_of_mean - mean_entropy).clamp_min(0)


ACQUISITIONS: dict[str, Acquisition] = {
    "margin": margin,
    "entropy": entropy,
    "least_confidence": least_confidence,
    "random": random,
    "bald": bald,
}


def get_acquisition(name: str) -> Acquisition:
    """The scoring function registered under `name`; raises `AcquisitionError` listing the valid names."""
    try:
        return ACQUISITIONS[name]
    except KeyError:
        raise AcquisitionError(f"unknown acquisition {name!r}; choose one of {sorted(ACQUISITIONS)}") from None


def score_pixels(strategy: str, probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Score every pixel of one image; higher = more informative.

    probs: class probabilities, (C, H, W) for one deterministic pass or (T, C, H, W) for T MC-dropout passes.
    Returns an (H, W) float32 map. For T > 1 the non-BALD strategies average their per-pass maps.
    """
    score = get_acquisition(strategy)
    probs = _check_probs(probs)
    return score(probs, generator).to(torch.float32)


def score_batch(strategy: str, probs: Tensor, generator: torch.Generator | None = None) -> np.ndarray:
    """Score a batch of images at once: `probs` (N, C, H, W), or (N, T, C, H, W) for T MC-dropout passes.

    Returns an (N, H, W) float32 array whose row i equals `score_pixels(strategy, probs[i], generator)`, images
    taken in order. Margin and least confidence of one pass run vectorised over the batch in numpy (a running
    top-two over the C classes: no sort, no torch thread pool); the other strategies score image by image.
    """
    get_acquisition(strategy)
    if not isinstance(probs, Tensor) or probs.ndim not in (4, 5):
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise AcquisitionError(f"a batch of probs must be (N, C, H, W) or (N, T, C, H, W), got {shape}")
    single_pass = probs.ndim == 4 or probs.shape[1] == 1
    if strategy not in ("margin", "least_confidence") or not single_pass or probs.device.type != "cpu":
        return np.stack([score_pixels(strategy, image, generator).cpu().numpy() for image in probs]).reshape(
            len(probs), *probs.shape[-2:]
        )
    values = _check_probs_numpy(probs.reshape(len(probs), *probs.shape[-3:]).numpy())  # N, C, H, W
    top1 = values.max(axis=1)
    if strategy == "least_confidence":
        return (1 - top1).astype(np.float32, copy=False)
    # Second largest per pixel: the running max of min(top1 so far, p_c) reproduces topk(2)'s values exactly.
    top1, top2 = np.maximum(values[:, 0], values[:, 1]), np.minimum(values[:, 0], values[:, 1])
    lower = np.empty_like(top1)
    for c in range(2, values.shape[1]):
        np.minimum(top1, values[:, c], out=lower)
        np.maximum(top2, lower, out=top2)
        np.maximum(top1, values[:, c], out=top1)
    return (1 - (top1 - top2)).astype(np.float32, copy=False)


def _check_probs_numpy(probs: np.ndarray) -> np.ndarray:
    """`_check_probs` for an (N, C, H, W) numpy batch: the same rules and messages, without torch's dispatch."""
    if probs.shape[1] < 2:
        raise AcquisitionError(f"probs need at least 2 classes, got shape {tuple(probs.shape)}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise AcquisitionError(f"probs must be floating point, got {probs.dtype}")
    if not np.isfinite(probs).all():
        raise AcquisitionError("probs contain NaN or infinite values")
    if probs.min() < 0:
        raise AcquisitionError(f"probs contain negative values (min {probs.min():g})")
    tolerance = max(_SUM_TOLERANCE, probs.shape[1] * np.finfo(probs.dtype).eps)
    worst = float(np.abs(probs.sum(axis=1, dtype=np.float32) - 1).max())
    if worst > tolerance:
        raise AcquisitionError(f"probs must sum to 1 over classes (dim C); the worst pixel is off by {worst:g}")
    return probs.astype(np.float32) if probs.dtype == np.float16 else probs


def _check_probs(probs: Tensor) -> Tensor:
    """Return probs as (T, C, H, W); raise `AcquisitionError` unless they are probability vectors over C."""
    if not isinstance(probs, Tensor):
        raise AcquisitionError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
    if probs.ndim == 3:
        probs = probs.unsqueeze(0)
    if probs.ndim != 4:
        raise AcquisitionError(f"probs must have shape (C, H, W) or (T, C, H, W), got {tuple(probs.shape)}")
    if probs.shape[1] < 2:
        raise AcquisitionError(f"probs need at least 2 classes, got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise AcquisitionError(f"probs must be floating point, got {probs.dtype}")
    if not torch.isfinite(probs).all():
        raise AcquisitionError("probs contain NaN or infinite values")
    if (probs < 0).any():
        raise AcquisitionError(f"probs contain negative values (min {probs.min().item():g})")
    # Half-precision probabilities round each of the C terms, so their sum may drift further than float32's.
    tolerance = max(_SUM_TOLERANCE, probs.shape[1] * torch.finfo(probs.dtype).eps)
    worst = (probs.sum(dim=1, dtype=torch.float32) - 1).abs().max().item()
    if worst > tolerance:
        raise AcquisitionError(f"probs must sum to 1 over classes (dim C); the worst pixel is off by {worst:g}")
    return probs.float() if probs.dtype in (torch.float16, torch.bfloat16) else probs


def select_pixels(
    scores: Tensor | np.ndarray,
    *,
    k: int,
    exclude: Tensor | np.ndarray | None = None,
    top_fraction: float = 0.05,
    min_distance: float = 0.0,
    generator: torch.Generator,
) -> np.ndarray:
    """PixelPick's pick: k pixels drawn uniformly from the most informative `top_fraction` of the candidates.

    Candidates are the pixels not in `exclude` (already labelled, or void in simulation). They are removed from the
    pool rather than given a low score, so they can never be picked again and the budget is always fully spent.
    The pool is the top max(k, floor(top_fraction * H * W)) candidates by score; top_fraction = 0 is plain top-k.
    Candidates tied at the pool's lowest score are admitted at random (from `generator`) when not all fit.
    With `min_distance` > 0 the draw spreads out: pool pixels are taken in random order, skipping any closer than
    `min_distance` pixels to one already taken, and only if that leaves the budget unspent are the skipped ones
    taken (in the same order). Uncertain pixels cluster along boundaries, so without it picks bunch together.
    Returns min(k, number of candidates) unique (y, x) pixels as an (n, 2) int64 array, sorted row-major.
    """
    values = _to_numpy(scores)
    if values.ndim != 2:
        raise AcquisitionError(f"scores must be an (H, W) map, got shape {tuple(values.shape)}")
    if k < 0:
        raise AcquisitionError(f"k must be >= 0, got {k}")
    if not 0 <= top_fraction <= 1:
        raise AcquisitionError(f"top_fraction must be in [0, 1], got {top_fraction}")
    if not min_distance >= 0:
        raise AcquisitionError(f"min_distance must be >= 0, got {min_distance}")
    if not np.isfinite(values).all():
        raise AcquisitionError("scores contain NaN or infinite values; they cannot be ranked")
    height, width = values.shape

    excluded = None
    if exclude is not None:
        excluded = _to_numpy(exclude)
        if excluded.shape != values.shape or excluded.dtype != np.bool_:
            raise AcquisitionError(
                f"exclude must be a bool mask of shape {tuple(values.shape)}, "
                f"got {excluded.dtype} {tuple(excluded.shape)}"
            )
        excluded = excluded.reshape(-1)
    n_candidates = values.size - (int(np.count_nonzero(excluded)) if excluded is not None else 0)

    n_picks = min(k, n_candidates)
    pool_size = min(max(k, math.floor(top_fraction * height * width)), n_candidates)
    pool = _top_pool(values.reshape(-1), excluded, pool_size, n_candidates, generator)  # sorted flat indices
    if min_distance > 0:
        order = pool[torch.randperm(pool_size, generator=generator, device=generator.device).cpu().numpy()]
        picked = np.sort(_spread(order, width, n_picks, min_distance))
    else:
        draw = torch.randperm(pool_size, generator=generator, device=generator.device)[:n_picks].cpu().numpy()
        picked = np.sort(pool[draw])  # flat indices, row-major
    return np.stack((picked // width, picked % width), axis=1).astype(np.int64)


def _spread(order: np.ndarray, width: int, n_picks: int, min_distance: float) -> np.ndarray:
    """The first `n_picks` of `order` (flat indices) that keep `min_distance` from each other, topped up with the
    skipped ones, in order, when too few do."""
    rows, cols = order // width, order % width
    taken = np.zeros(len(order), dtype=bool)
    chosen: list[int] = []
    for i in range(len(order)):
        if len(chosen) == n_picks:
            break
        if chosen and np.hypot(rows[chosen] - rows[i], cols[chosen] - cols[i]).min() < min_distance:
            continue
        chosen.append(i)
        taken[i] = True
    if len(chosen) < n_picks:
        chosen += list(np.flatnonzero(~taken)[: n_picks - len(chosen)])
    return order[chosen]


def _to_numpy(array: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _top_pool(
    values: np.ndarray, excluded: np.ndarray | None, size: int, n_candidates: int, generator: torch.Generator
) -> np.ndarray:
    """Sorted flat indices of the `size` highest-scoring candidates (a fixed order makes the draw reproducible).

    One linear-time partition finds the pool's lowest score, and one pass collects the pixels at or above it: no
    sort of the map (the reference ran a full top-k on every map) and no per-candidate index arrays. Excluded pixels
    score -inf in a copy, below every candidate, so they never reach the pool.
    """
    if size == n_candidates:  # every candidate is in the pool
        return np.arange(values.size) if excluded is None else np.flatnonzero(~excluded)
    if size == 0:
        return np.empty(0, dtype=np.int64)
    if excluded is not None:
        if not np.issubdtype(values.dtype, np.floating):
            values = values.astype(np.float64)
        values = np.where(excluded, -np.inf, values)
    cut = values.size - size
    threshold = np.partition(values, cut)[cut]  # the size-th highest score, a candidate's (size < n_candidates)
    pool = np.flatnonzero(values >= threshold)
    if len(pool) > size:  # ties at the threshold: admit just enough of them, chosen at random
        tied = values[pool] == threshold
        ties = pool[tied]
        keep = torch.randperm(len(ties), generator=generator, device=generator.device)[: size - (len(pool) - len(ties))]
        pool = np.sort(np.concatenate((pool[~tied], ties[keep.cpu().numpy()])))
    return pool


def class_weights(counts: np.ndarray, power: float) -> np.ndarray:
    """Per-class weights from the labelled pixels per class: (1 / (C x frequency)) ** power.

    Classes labelled equally often all weigh 1; a class labelled less often than average weighs more. Counts are
    smoothed by one, so a class no one has labelled yet gets the largest weight rather than an infinite one.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) < 2 or (counts < 0).any():
        raise AcquisitionError(f"class counts must be a non-negative vector over >= 2 classes, got {counts}")
    if power < 0:
        raise AcquisitionError(f"the class-balance power must be >= 0, got {power}")
    frequency = (counts + 1) / (counts.sum() + len(counts))
    return (1 / (len(counts) * frequency)) ** power


def balance_scores(scores: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Class-balanced scores: each pixel's score times its class weight expected under the model, sum_c p_c w_c.

    The expectation, not the weight of the argmax class, so a pixel the model half believes to be a rare class
    still counts as one; class-balanced acquisition after Cai et al. (CVPR 2021) and Schachtsiek et al. (2023).
    probs: (C, H, W) for the (H, W) scores; weights: (C,), from `class_weights`.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[1:] != np.shape(scores) or len(weights) != probs.shape[0]:
        raise AcquisitionError(f"probs {probs.shape} do not match scores {np.shape(scores)} and "
                               f"{len(weights)} class weights")
    expected_weight = np.tensordot(np.asarray(weights, dtype=np.float32), probs, axes=1)
    return (np.asarray(scores, dtype=np.float32) * expected_weight).astype(np.float32, copy=False)


def random_pixels(
    shape: tuple[int, int],
    k: int,
    exclude: Tensor | np.ndarray | None,
    generator: torch.Generator,
) -> np.ndarray:
    """k pixels drawn uniformly without replacement from the non-excluded pixels: the initial round's query.

    It is `select_pixels` with the whole candidate set as the pool. Same return format.
    """
    return select_pixels(torch.zeros(shape), k=k, exclude=exclude, top_fraction=1.0, generator=generator)
