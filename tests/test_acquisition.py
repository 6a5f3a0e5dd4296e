"""Acquisition scores and PixelPick's selection: known answers (baal-style), errors and properties."""

from math import log

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pixelpick.acquisition import (
    ACQUISITIONS,
    balance_scores,
    class_weights,
    get_acquisition,
    random_pixels,
    score_batch,
    score_pixels,
    select_pixels,
)
from pixelpick.errors import AcquisitionError


def image_probs() -> torch.Tensor:
    """A 2x2 image over 3 classes whose pixel ranking is obvious: (C, H, W)."""
    per_pixel = {
        (0, 0): [1.0, 0.0, 0.0],  # certain
        (0, 1): [0.6, 0.3, 0.1],  # spread over three classes
        (1, 0): [0.5, 0.5, 0.0],  # a tie between two classes
        (1, 1): [0.8, 0.1, 0.1],  # fairly sure
    }
    probs = torch.zeros(3, 2, 2, dtype=torch.float64)
    for (y, x), p in per_pixel.items():
        probs[:, y, x] = torch.tensor(p)
    return probs


def mc_probs() -> torch.Tensor:
    """Two MC passes over a 1x3 image, 2 classes: (T, C, H, W)."""
    pass_a = [[1.0, 0.5, 1.0], [0.0, 0.5, 0.0]]
    pass_b = [[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]
    return torch.tensor([pass_a, pass_b], dtype=torch.float64).unsqueeze(2)


def entropy_of(*p: float) -> float:
    return -sum(q * log(q) for q in p if q > 0)


# The exact score map each strategy must produce; "random" has no fixed answer and is tested by its properties.
KNOWN_ANSWERS = {
    "margin": (image_probs(), [[0.0, 0.7], [1.0, 0.3]], [(1, 0)]),
    "entropy": (
        image_probs(),
        [[0.0, entropy_of(0.6, 0.3, 0.1)], [log(2), entropy_of(0.8, 0.1, 0.1)]],
        [(0, 1)],
    ),
    "least_confidence": (image_probs(), [[0.0, 0.4], [0.5, 0.2]], [(1, 0)]),
    # Pixel 1 is a confident tie in both passes (aleatoric, no disagreement); pixel 2 flips between passes.
    "bald": (mc_probs(), [[0.0, 0.0, log(2)]], [(0, 2)]),
}
STRATEGIES = sorted(ACQUISITIONS)
DETERMINISTIC = sorted(set(ACQUISITIONS) - {"random"})


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_mc_probs() -> torch.Tensor:
    """Probabilities every strategy accepts: MC passes (T = 3), 4 classes, 5x6 pixels."""
    return torch.softmax(torch.randn(3, 4, 5, 6, generator=generator(1)), dim=1)


def test_every_deterministic_strategy_has_a_known_answer():
    assert set(KNOWN_ANSWERS) == set(DETERMINISTIC)


@pytest.mark.parametrize("strategy", sorted(KNOWN_ANSWERS))
def test_known_scores_and_top_pixel(strategy):
    probs, expected, top = KNOWN_ANSWERS[strategy]
    scores = score_pixels(strategy, probs)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float32))
    picked = select_pixels(scores, k=len(top), top_fraction=0, generator=generator())
    assert picked.tolist() == [list(p) for p in top]


def test_margin_top_two_is_sorted_row_major():
    scores = score_pixels("margin", image_probs())
    picked = select_pixels(scores, k=2, top_fraction=0, generator=generator())
    assert picked.dtype == np.int64
    assert picked.tolist() == [[0, 1], [1, 0]]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scores_are_finite_non_negative_maps(strategy):
    scores = score_pixels(strategy, random_mc_probs(), generator())
    assert scores.shape == (5, 6) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and (scores >= 0).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scores_are_deterministic_for_a_seed(strategy):
    first = score_pixels(strategy, random_mc_probs(), generator(3))
    again = score_pixels(strategy, random_mc_probs(), generator(3))
    assert torch.equal(first, again)


@pytest.mark.parametrize("strategy", DETERMINISTIC)
def test_uniform_is_at_least_as_informative_as_certain(strategy):
    certain = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1).expand(2, 4, 1, 1)
    uniform = torch.full((2, 4, 1, 1), 0.25)
    assert score_pixels(strategy, uniform) >= score_pixels(strategy, certain)


@pytest.mark.parametrize("strategy", ["margin", "entropy", "least_confidence"])
def test_mc_passes_average_the_per_pass_scores(strategy):
    # Each pass is certain, but of different classes: the mean probability is a tie, the mean score is not.
    passes = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1)
    assert score_pixels(strategy, passes).item() == pytest.approx(0.0)
    expected = torch.stack([score_pixels(strategy, p) for p in passes]).mean(0)
    torch.testing.assert_close(score_pixels(strategy, passes), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_probabilities_are_accepted(dtype):
    probs = torch.softmax(torch.randn(19, 8, 8, generator=generator()), dim=0)
    expected = score_pixels("entropy", probs)
    torch.testing.assert_close(score_pixels("entropy", probs.to(dtype)), expected, atol=0.05, rtol=0.02)


def test_entropy_with_zero_probabilities_is_finite():
    probs = torch.zeros(3, 4, 4)
    probs[0] = 1.0
    scores = score_pixels("entropy", probs)
    assert torch.equal(scores, torch.zeros(4, 4))


def test_bald_is_zero_when_passes_agree_and_positive_when_they_disagree():
    agree = torch.softmax(torch.randn(1, 4, 3, 3, generator=generator()), 1).expand(5, 4, 3, 3)
    assert torch.equal(score_pixels("bald", agree), torch.zeros(3, 3))
    disagree = torch.softmax(torch.randn(5, 4, 3, 3, generator=generator()) * 3, 1)
    assert (score_pixels("bald", disagree) > 0).all()


def test_bald_needs_several_passes():
    with pytest.raises(AcquisitionError, match="T > 1"):
        score_pixels("bald", image_probs())


def test_random_ignores_the_model_and_needs_a_generator():
    a = score_pixels("random", image_probs(), generator(5))
    b = score_pixels("random", torch.full((3, 2, 2), 1 / 3), generator(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, score_pixels("random", image_probs(), generator(6)))
    with pytest.raises(AcquisitionError, match="torch.Generator"):
        score_pixels("random", image_probs())


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(AcquisitionError, match="unknown acquisition 'margn'.*margin"):
        get_acquisition("margn")


@pytest.mark.parametrize(
    ("probs", "message"),
    [
        (torch.full((2, 2, 2), float("nan")), "NaN"),
        (torch.tensor([1.5, -0.5]).view(2, 1, 1), "negative"),
        (torch.full((2, 2, 2), 0.4), "sum to 1"),
        (torch.ones(2, 2), "shape"),
        (torch.ones(1, 2, 2), "at least 2 classes"),
        (torch.ones(2, 1, 1, dtype=torch.int64), "floating point"),
    ],
)
def test_invalid_probabilities_are_rejected(probs, message):
    with pytest.raises(AcquisitionError, match=message):
        score_pixels("margin", probs)


# --- selection -------------------------------------------------------------------------------------------------


def test_select_never_returns_an_excluded_pixel_and_spends_the_budget():
    scores = torch.arange(16.0).view(4, 4)  # the most informative pixels are the bottom row
    exclude = torch.zeros(4, 4, dtype=torch.bool)
    exclude[3] = True  # ...but they are already labelled
    picked = select_pixels(scores, k=4, exclude=exclude, top_fraction=0, generator=generator())
    assert picked.tolist() == [[2, 0], [2, 1], [2, 2], [2, 3]]


def test_select_returns_every_candidate_when_fewer_than_k():
    exclude = np.ones((3, 3), dtype=bool)
    exclude[0, 2] = exclude[2, 1] = False
    picked = select_pixels(np.zeros((3, 3)), k=5, exclude=exclude, generator=generator())
    assert picked.tolist() == [[0, 2], [2, 1]]


def test_select_draws_within_the_top_fraction():
    scores = torch.arange(100.0).view(10, 10)
    draws = [select_pixels(scores, k=3, top_fraction=0.1, generator=generator(seed)) for seed in range(20)]
    flat = {int(y * 10 + x) for picked in draws for y, x in picked}
    assert flat <= set(range(90, 100))  # the top 10% of 100 pixels
    assert len(flat) > 3  # a random draw from the pool, not plain top-k


def test_select_pool_is_at_least_k():
    scores = torch.arange(100.0).view(10, 10)
    picked = select_pixels(scores, k=5, top_fraction=0.01, generator=generator())
    assert picked.tolist() == [[9, 5], [9, 6], [9, 7], [9, 8], [9, 9]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": torch.tensor([[float("nan")]])}, "NaN"),
        ({"scores": torch.zeros(2, 2, 2)}, r"\(H, W\)"),
        ({"exclude": torch.zeros(3, 3, dtype=torch.bool)}, "exclude"),
        ({"exclude": torch.zeros(2, 2)}, "bool"),
        ({"k": -1}, "k must be"),
        ({"top_fraction": 1.5}, "top_fraction"),
    ],
)
def test_select_rejects_bad_input(kwargs, message):
    arguments = {"scores": torch.zeros(2, 2), "k": 1, "generator": generator(), **kwargs}
    with pytest.raises(AcquisitionError, match=message):
        select_pixels(**arguments)


def test_random_pixels_are_uniform_over_candidates():
    exclude = np.zeros((4, 5), dtype=bool)
    exclude[:, 0] = True
    counts = np.zeros((4, 5))
    for seed in range(400):
        picked = random_pixels((4, 5), 4, exclude, generator(seed))
        assert len(picked) == 4 and len(np.unique(picked, axis=0)) == 4
        counts[picked[:, 0], picked[:, 1]] += 1
    assert counts[:, 0].sum() == 0
    # 400 draws x 4 pixels over 16 candidates: 100 hits each on average.
    assert counts[:, 1:].min() > 60 and counts[:, 1:].max() < 140


@st.composite
def selection_problems(draw):
    height, width = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    scores = draw(arrays(np.float32, (height, width), elements=st.floats(0, 1, width=32)))
    exclude = draw(arrays(np.bool_, (height, width)))
    k = draw(st.integers(0, height * width + 3))
    top_fraction = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    return scores, exclude, k, top_fraction, draw(st.integers(0, 2**31))


@settings(max_examples=150, deadline=None)
@given(selection_problems())
def test_select_properties(problem):
    scores, exclude, k, top_fraction, seed = problem
    picked = select_pixels(scores, k=k, exclude=exclude, top_fraction=top_fraction, generator=generator(seed))
    n_candidates = int((~exclude).sum())
    assert picked.shape == (min(k, n_candidates), 2) and picked.dtype == np.int64
    assert not exclude[picked[:, 0], picked[:, 1]].any()
    flat = picked[:, 0] * scores.shape[1] + picked[:, 1]
    assert np.all(np.diff(flat) > 0)  # unique and row-major
    again = select_pixels(scores, k=k, exclude=exclude, top_fraction=top_fraction, generator=generator(seed))
    assert np.array_equal(picked, again)
    if len(picked):
        # Every pick lies within the pool: no candidate outside it may score higher than the pool's weakest member.
        pool_size = min(max(k, int(top_fraction * scores.size)), n_candidates)
        threshold = np.sort(scores[~exclude])[::-1][pool_size - 1]
        assert scores[picked[:, 0], picked[:, 1]].min() >= threshold


@settings(max_examples=60, deadline=None)
@given(
    logits=arrays(np.float32, (2, 3, 2, 2), elements=st.floats(-20, 20, width=32)),
    strategy=st.sampled_from(STRATEGIES),
)
def test_scores_of_any_softmax_are_finite_and_bounded(logits, strategy):
    probs = torch.softmax(torch.from_numpy(logits), dim=1)
    scores = score_pixels(strategy, probs, generator())
    assert torch.isfinite(scores).all()
    assert (scores >= 0).all() and (scores <= log(3) + 1e-5).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 1, 4, 5, 6), (2, 3, 4, 5, 6)])
def test_a_batch_scores_as_its_images_do_one_by_one(strategy, shape):
    if strategy == "bald" and (len(shape) == 4 or shape[1] < 2):
        pytest.skip("BALD needs MC passes")
    probs = torch.softmax(torch.randn(*shape, generator=generator(3)), dim=-3)
    batch = score_batch(strategy, probs, generator(4))
    one_by_one = generator(4)
    expected = np.stack([score_pixels(strategy, image, one_by_one).numpy() for image in probs])
    assert batch.dtype == np.float32 and batch.shape == (shape[0], *shape[-2:])
    np.testing.assert_array_equal(batch, expected)


@pytest.mark.parametrize(
    ("probs", "message"),
    [
        (torch.full((1, 2, 2, 2), float("nan")), "NaN"),
        (torch.tensor([[[[1.5]], [[-0.5]]]]), "negative"),
        (torch.full((1, 2, 2, 2), 0.7), "sum to 1"),
        (torch.ones(1, 1, 2, 2), "at least 2 classes"),
        (torch.ones(2, 2), r"\(N, C, H, W\)"),
    ],
)
def test_a_batch_is_checked_like_one_image(probs, message):
    with pytest.raises(AcquisitionError, match=message):
        score_batch("margin", probs)


def test_ties_at_the_pools_edge_are_admitted_at_random_and_reproducibly():
    scores = np.zeros((10, 10), dtype=np.float32)
    scores[0, :5] = 2.0  # five pixels clearly on top, then 95 tied for the pool's last five places
    pools = set()
    for seed in range(30):
        picked = select_pixels(scores, k=10, top_fraction=0.1, generator=generator(seed))
        assert len(picked) == 10 and {(0, x) for x in range(5)} <= set(map(tuple, picked.tolist()))
        again = select_pixels(scores, k=10, top_fraction=0.1, generator=generator(seed))
        assert np.array_equal(picked, again)
        pools.add(tuple(map(tuple, picked.tolist())))
    assert len(pools) > 20  # the tied places go to different pixels, not always the first ones in row order


def test_excluded_pixels_never_enter_the_pool_even_when_they_score_highest():
    scores = torch.arange(100.0).view(10, 10)
    exclude = scores >= 50
    for seed in range(10):
        picked = select_pixels(scores, k=5, exclude=exclude, top_fraction=0.1, generator=generator(seed))
        flat = set((picked[:, 0] * 10 + picked[:, 1]).tolist())
        assert flat <= set(range(40, 50))


def test_class_weights_favour_classes_labelled_less_often():
    assert class_weights(np.array([50, 50, 50]), power=1.0) == pytest.approx([1, 1, 1])
    weights = class_weights(np.array([900, 99, 0]), power=1.0)
    assert weights[0] < 1 < weights[1] < weights[2] < np.inf  # never labelled: the largest weight, still finite
    assert class_weights(np.array([900, 99, 0]), power=0.0) == pytest.approx([1, 1, 1])
    assert class_weights(np.array([900, 99, 0]), power=2.0) == pytest.approx(weights**2)
    with pytest.raises(AcquisitionError, match="non-negative"):
        class_weights(np.array([3, -1]), power=1.0)


def test_class_balance_brings_a_rare_predicted_class_into_the_pool():
    rng = np.random.default_rng(0)
    scores = 0.5 + 0.01 * rng.random((20, 20)).astype(np.float32)  # uncertainty alone: picks anywhere
    probs = np.zeros((2, 20, 20), np.float32)
    probs[0] = 1
    probs[:, 0] = np.array([0.1, 0.9])[:, None]  # the first row (20 pixels) is most likely class 1, the rare one
    weights = class_weights(np.array([1000, 10]), power=1.0)
    balanced = balance_scores(scores, probs, weights)
    assert balanced[1:] == pytest.approx(scores[1:] * weights[0])
    picks = select_pixels(balanced, k=5, top_fraction=0.05, generator=torch.Generator().manual_seed(0))
    assert (picks[:, 0] == 0).all()  # the pool is exactly the 20 pixels of the rare class
    plain = select_pixels(scores, k=5, top_fraction=0.05, generator=torch.Generator().manual_seed(0))
    assert (plain[:, 0] != 0).any()
    with pytest.raises(AcquisitionError, match="do not match"):
        balance_scores(scores, probs[:, :10], weights)


def test_min_distance_spreads_the_picks_and_still_spends_the_budget():
    scores = np.zeros((20, 20), np.float32)
    scores[5:9, 5:15] = 1  # 40 uncertain pixels along a "boundary": the pool, at top_fraction 0.1
    generator = torch.Generator().manual_seed(0)
    spread = select_pixels(scores, k=3, top_fraction=0.1, min_distance=4, generator=generator)
    assert len(spread) == 3 and (scores[spread[:, 0], spread[:, 1]] == 1).all()
    gaps = np.hypot(*(spread[:, None] - spread[None]).transpose(2, 0, 1))
    assert gaps[~np.eye(3, dtype=bool)].min() >= 4
    # The pool cannot hold 40 picks 4 pixels apart: the closest ones top the budget up.
    crowded = select_pixels(scores, k=40, top_fraction=0.1, min_distance=4, generator=generator)
    assert len(np.unique(crowded, axis=0)) == 40 and (scores[crowded[:, 0], crowded[:, 1]] == 1).all()
    again = select_pixels(scores, k=3, top_fraction=0.1, min_distance=4, generator=torch.Generator().manual_seed(0))
    assert (again == spread).all()
    with pytest.raises(AcquisitionError, match="min_distance"):
        select_pixels(scores, k=3, min_distance=-1, generator=generator)
