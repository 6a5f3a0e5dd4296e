"""Paired augmentation keeps each labelled pixel exactly one supervised point on its own pixel."""

from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from pixelpick.errors import TransformInputError
from pixelpick.transforms import (
    EvalTransform,
    TrainTransform,
    collate_sparse,
    point_logits,
    sparse_cross_entropy,
)

IGNORE = 255
TILE = 8
TILE_ROWS, TILE_COLS = 6, 8  # a 48 x 64 image of 48 uniformly coloured 8 x 8 tiles
GEOMETRY_ONLY = dict(photometric=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), ignore_index=IGNORE)


def tiled_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An image of distinctly coloured tiles, a mask of tile ids, and one labelled pixel per tile (its label is the
    tile id, so a point can be traced back to the pixel it came from)."""
    tile_colours = np.random.default_rng(0).integers(0, 256, (TILE_ROWS, TILE_COLS, 3), dtype=np.uint8)
    tile_ids = np.arange(TILE_ROWS * TILE_COLS).reshape(TILE_ROWS, TILE_COLS)
    image = np.kron(tile_colours, np.ones((TILE, TILE, 1), dtype=np.uint8))
    mask = np.kron(tile_ids, np.ones((TILE, TILE), dtype=np.int64))
    rows, cols = np.meshgrid(np.arange(TILE_ROWS), np.arange(TILE_COLS), indexing="ij")
    pixels = np.stack([rows.ravel() * TILE + TILE // 2, cols.ravel() * TILE + TILE // 2], axis=1)
    return image, mask, pixels, tile_ids.ravel(), tile_colours.reshape(-1, 3)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), crop_size=st.sampled_from([None, (40, 40), (24, 56), (160, 160)]))
def test_surviving_points_land_on_their_own_pixel_once(seed, crop_size):
    image, mask, pixels, labels, tile_colours = tiled_scene()
    transform = TrainTransform(crop_size=crop_size, **GEOMETRY_ONLY)

    out = transform(image, pixels=pixels, pixel_labels=labels, mask=mask, generator=seeded(seed))

    kept = out["point_labels"]
    assert len(torch.unique(kept)) == len(kept)  # never duplicated
    assert set(kept.tolist()) <= set(labels.tolist())
    y, x = out["points"].floor().long().unbind(dim=1)
    assert torch.equal(out["mask"][y, x], kept)  # the dense mask agrees about which tile each point is on
    colour_at_point = out["image"][:, y, x].T * 255
    torch.testing.assert_close(colour_at_point, torch.from_numpy(tile_colours[kept.numpy()]).float(), atol=1e-3, rtol=0)
    if crop_size is None or crop_size == (160, 160):  # nothing can fall outside: even 2x of 48x64 fits in 160x160
        assert sorted(kept.tolist()) == labels.tolist()


@pytest.mark.parametrize("seed", range(8))
def test_points_are_dropped_exactly_when_outside_the_crop(seed):
    image = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    ys, xs = np.meshgrid(np.arange(24), np.arange(32), indexing="ij")
    pixels = np.stack([ys.ravel(), xs.ravel()], axis=1)  # every pixel labelled
    transform = TrainTransform(crop_size=(16, 16), scale_range=(1.0, 1.0), hflip_p=0.0, **GEOMETRY_ONLY)

    out = transform(image, pixels=pixels, pixel_labels=np.arange(len(pixels)), generator=seeded(seed))

    # Recover the crop window from the content; every labelled pixel inside it must survive, and nothing else.
    crop = (out["image"].permute(1, 2, 0) * 255).round().byte().numpy()
    (top, left), = [(t, left) for t in range(24 - 16 + 1) for left in range(32 - 16 + 1)
                    if np.array_equal(image[t : t + 16, left : left + 16], crop)]
    inside = (ys.ravel() >= top) & (ys.ravel() < top + 16) & (xs.ravel() >= left) & (xs.ravel() < left + 16)
    assert out["point_labels"].tolist() == np.flatnonzero(inside).tolist()
    expected_points = pixels[inside] + 0.5 - np.array([top, left])
    assert torch.equal(out["points"], torch.from_numpy(expected_points).float())


def test_scaling_moves_points_by_the_exact_size_ratio():
    image = np.zeros((15, 21, 3), dtype=np.uint8)
    pixels = np.array([[0, 0], [3, 4], [14, 20]])
    transform = TrainTransform(crop_size=None, scale_range=(0.5, 0.5), hflip_p=0.0, **GEOMETRY_ONLY)

    out = transform(image, pixels=pixels, pixel_labels=np.array([0, 1, 2]))

    assert out["image"].shape == (3, 8, 10)  # round(7.5) = 8, round(10.5) = 10
    expected = (pixels + 0.5) * np.array([8 / 15, 10 / 21])
    torch.testing.assert_close(out["points"], torch.from_numpy(expected).float())


def test_flip_mirrors_continuous_x():
    image, mask, pixels, labels, _ = tiled_scene()
    transform = TrainTransform(crop_size=None, scale_range=(1.0, 1.0), hflip_p=1.0, **GEOMETRY_ONLY)

    out = transform(image, pixels=pixels, pixel_labels=labels, mask=mask)

    expected = np.stack([pixels[:, 0] + 0.5, 64 - (pixels[:, 1] + 0.5)], axis=1)  # pixel x -> 63 - x
    assert torch.equal(out["points"], torch.from_numpy(expected).float())
    assert torch.equal(out["mask"], torch.from_numpy(mask[:, ::-1].copy()))


def test_padding_is_the_mean_colour_and_ignore():
    image = np.full((10, 12, 3), 200, dtype=np.uint8)
    transform = TrainTransform(crop_size=(16, 20), scale_range=(1.0, 1.0), hflip_p=0.0, photometric=True,
                               mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2), ignore_index=IGNORE)

    out = transform(image, mask=np.zeros((10, 12), dtype=np.int64), generator=seeded(3))

    assert out["image"].shape == (3, 16, 20)
    assert (out["image"][:, 10:, :] == 0).all() and (out["image"][:, :, 12:] == 0).all()
    assert (out["mask"][10:, :] == IGNORE).all() and (out["mask"][:, 12:] == IGNORE).all()
    assert (out["mask"][:10, :12] == 0).all()


def test_same_seed_gives_the_same_sample_and_another_seed_does_not():
    image, mask, pixels, labels, _ = tiled_scene()
    transform = TrainTransform(crop_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, ignore_index=IGNORE)

    def sample(seed):
        return transform(image, pixels=pixels, pixel_labels=labels, mask=mask, generator=seeded(seed))

    first, again, other = sample(7), sample(7), sample(8)
    for key in ("image", "points", "point_labels", "mask"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["image"], other["image"])


def test_photometric_jitter_changes_colours_only():
    image, mask, pixels, labels, _ = tiled_scene()
    plain = TrainTransform(crop_size=(32, 32), **GEOMETRY_ONLY)
    jittered = TrainTransform(crop_size=(32, 32), **{**GEOMETRY_ONLY, "photometric": True})

    outs = [t(image, pixels=pixels, pixel_labels=labels, mask=mask, generator=seeded(11)) for t in (plain, jittered)]

    # Photometric draws come after the geometric ones, so the geometry is identical.
    for key in ("points", "point_labels", "mask"):
        assert torch.equal(outs[0][key], outs[1][key])
    assert not torch.equal(outs[0]["image"], outs[1]["image"])


def test_eval_transform_only_normalises():
    image = np.array([[[0, 51, 255]]], dtype=np.uint8)
    out = EvalTransform(mean=(0.0, 0.2, 0.5), std=(0.5, 0.1, 0.25))(
        image, pixels=np.array([[0, 0]]), pixel_labels=np.array([4]), mask=np.array([[4]])
    )
    torch.testing.assert_close(out["image"][:, 0, 0], torch.tensor([0.0, 0.0, 2.0]))
    assert out["points"].tolist() == [[0.5, 0.5]] and out["point_labels"].tolist() == [4]
    assert out["mask"].tolist() == [[4]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pixels=np.array([[4, 0]]), pixel_labels=np.array([1])), "outside"),
        (dict(pixels=np.array([[0, -1]]), pixel_labels=np.array([1])), "outside"),
        (dict(pixels=np.array([0, 1]), pixel_labels=np.array([1])), "pixels must"),
        (dict(pixels=np.array([[0.5, 1.0]]), pixel_labels=np.array([1])), "pixels must"),
        (dict(pixels=np.array([[0, 1]]), pixel_labels=np.array([1, 2])), "pixel_labels"),
        (dict(pixels=np.array([[0, 1]])), "together"),
        (dict(mask=np.zeros((4, 4), dtype=np.int64)), "mask shape"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    for transform in (EvalTransform(mean=(0,) * 3, std=(1,) * 3), TrainTransform(crop_size=None, **GEOMETRY_ONLY)):
        with pytest.raises(TransformInputError, match=message):
            transform(image, **kwargs)


def test_non_uint8_image_is_rejected():
    with pytest.raises(TransformInputError, match="uint8"):
        EvalTransform(mean=(0,) * 3, std=(1,) * 3)(np.zeros((4, 5, 3), dtype=np.float32))


def sample_with(n_points: int, mask: bool = True, **extra) -> dict:
    return {
        "image": torch.zeros(3, 4, 4),
        "points": torch.full((n_points, 2), 1.5),
        "point_labels": torch.arange(n_points),
        "mask": torch.zeros(4, 4, dtype=torch.long) if mask else None,
        **extra,
    }


def test_collate_pads_points_with_ignore():
    batch = collate_sparse([sample_with(2, image_id="a"), sample_with(0, image_id="b")], ignore_index=IGNORE)

    assert batch["image"].shape == (2, 3, 4, 4) and batch["mask"].shape == (2, 4, 4)
    assert batch["points"].shape == (2, 2, 2)
    assert batch["point_labels"].tolist() == [[0, 1], [IGNORE, IGNORE]]
    assert batch["image_id"] == ["a", "b"]


def test_collate_without_masks_and_with_mixed_masks():
    assert collate_sparse([sample_with(1, mask=False)] * 2, ignore_index=IGNORE)["mask"] is None
    with pytest.raises(TransformInputError, match="only some"):
        collate_sparse([sample_with(1), sample_with(1, mask=False)], ignore_index=IGNORE)


def test_collate_works_as_a_dataloader_collate_fn():
    image, mask, pixels, labels, _ = tiled_scene()
    transform = TrainTransform(crop_size=(24, 24), **GEOMETRY_ONLY)
    samples = [transform(image, pixels=pixels, pixel_labels=labels, mask=mask, generator=seeded(s)) for s in range(3)]
    loader = torch.utils.data.DataLoader(samples, batch_size=3, collate_fn=partial(collate_sparse, ignore_index=IGNORE))

    batch = next(iter(loader))

    counts = [len(s["points"]) for s in samples]
    assert batch["points"].shape == (3, max(counts), 2)
    assert [(row != IGNORE).sum().item() for row in batch["point_labels"]] == counts


def test_point_logits_at_pixel_centres_are_the_pixel_logits():
    logits = torch.randn(2, 5, 9, 13)
    ys, xs = torch.meshgrid(torch.arange(9), torch.arange(13), indexing="ij")
    centres = torch.stack([ys.ravel(), xs.ravel()], dim=1) + 0.5

    sampled = point_logits(logits, centres.expand(2, -1, -1))

    # Equal up to float32 rounding of the grid; a half-pixel convention error would be off by O(1).
    torch.testing.assert_close(sampled, logits.flatten(2), rtol=0, atol=1e-5)


def test_point_logits_between_centres_interpolate_and_clamp_at_the_border():
    logits = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])  # 1 x 1 x 2 x 2
    points = torch.tensor([[[1.0, 1.0], [0.5, 1.0], [0.0, 0.0], [2.0, 2.0]]])

    # the middle of all four; halfway along the top row; the top-left and bottom-right image corners
    assert point_logits(logits, points)[0, 0].tolist() == [3.0, 1.0, 0.0, 6.0]


def test_sparse_loss_equals_dense_loss_on_the_same_pixels():
    logits = torch.randn(2, 4, 6, 7)
    pixels = torch.tensor([[[0, 0], [2, 5], [5, 6]], [[1, 1], [3, 3], [0, 0]]])
    labels = torch.tensor([[0, 3, 2], [1, 1, IGNORE]])  # the last one is padding
    dense = torch.full((2, 6, 7), IGNORE)
    for n in range(2):
        for (y, x), label in zip(pixels[n].tolist(), labels[n].tolist()):
            if label != IGNORE:
                dense[n, y, x] = label

    sparse = sparse_cross_entropy(logits, pixels + 0.5, labels, IGNORE)

    torch.testing.assert_close(sparse, F.cross_entropy(logits, dense, ignore_index=IGNORE))


def test_sparse_loss_without_usable_points_is_zero_and_differentiable():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = sparse_cross_entropy(logits, torch.zeros(1, 2, 2), torch.full((1, 2), IGNORE), IGNORE)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
