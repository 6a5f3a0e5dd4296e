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
    generator: torch.Generator,
) -> np.ndarray:
    """PixelPick's pick: k pixels drawn uniformly from the most informative `top_fraction` of the candidates.

    Candidates are the pixels not in `exclude` (already labelled, or void in simulation). They are removed from the
    pool rather than given a low score, so they can never be picked again and the budget is always fully spent.
    The pool is the top max(k, floor(top_fraction * H * W)) candidates by score; top_fraction = 0 is plain top-k.
    Returns min(k, number of candidates) unique (y, x) pixels as an (n, 2) int64 array, sorted row-major.
    """
    scores = torch.as_tensor(scores)
    if scores.ndim != 2:
        raise AcquisitionError(f"scores must be an (H, W) map, got shape {tuple(scores.shape)}")
    if k < 0:
        raise AcquisitionError(f"k must be >= 0, got {k}")
    if not 0 <= top_fraction <= 1:
        raise AcquisitionError(f"top_fraction must be in [0, 1], got {top_fraction}")
    if not torch.isfinite(scores).all():
        raise AcquisitionError("scores contain NaN or infinite values; they cannot be ranked")
    height, width = scores.shape

    candidates = torch.arange(height * width, device=scores.device)
    if exclude is not None:
        exclude = torch.as_tensor(exclude)
        if exclude.shape != scores.shape or exclude.dtype != torch.bool:
            raise AcquisitionError(
                f"exclude must be a bool mask of shape {tuple(scores.shape)}, "
                f"got {exclude.dtype} {tuple(exclude.shape)}"
            )
        candidates = candidates[~exclude.to(scores.device).flatten()]

    n_picks = min(k, len(candidates))
    pool_size = min(max(k, math.floor(top_fraction * height * width)), len(candidates))
    pool = _top_set(scores.flatten()[candidates].cpu().numpy(), pool_size)
    pool = torch.from_numpy(np.sort(candidates.cpu().numpy()[pool]))  # a fixed order makes the draw reproducible
    draw = torch.randperm(pool_size, generator=generator, device=generator.device)[:n_picks].cpu()
    picked = pool[draw].sort().values  # flat indices, row-major
    return torch.stack((picked // width, picked % width), dim=1).numpy().astype(np.int64)


def _top_set(values: np.ndarray, size: int) -> np.ndarray:
    """Indices of the `size` largest values, in no particular order.

    The pick is drawn at random from this set, so it need not be sorted: a linear-time partition replaces the
    full top-k sort the reference ran on every map.
    """
    if size >= len(values):
        return np.arange(len(values))
    return np.argpartition(-values, size - 1)[:size]


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
