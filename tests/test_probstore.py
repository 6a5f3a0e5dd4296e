import numpy as np
import pytest

from pixelpick.probstore import ProbabilityStore, ProbabilityWriter


def test_round_trip_per_image_shards_of_any_size(tmp_path):
    rng = np.random.default_rng(0)
    images = {"a.png": (5, 7), "sub/b.png": (3, 4)}  # different sizes need no padding
    written = {}
    with ProbabilityWriter(tmp_path / "p.zarr", images, num_classes=3, strategy="margin") as writer:
        for image_id, (h, w) in images.items():
            probs = rng.dirichlet(np.ones(3), size=(h, w)).transpose(2, 0, 1)
            scores = rng.random((h, w)).astype(np.float32)
            writer.write(image_id, probs, scores)
            written[image_id] = (probs, scores)
    store = ProbabilityStore(tmp_path / "p.zarr")
    assert store.image_ids == list(images) and store.strategy == "margin"
    for image_id, (probs, scores) in written.items():
        assert store.probs(image_id).dtype == np.float16
        np.testing.assert_allclose(store.probs(image_id), probs, atol=1e-3)
        np.testing.assert_array_equal(store.scores(image_id), scores)
    assert [i for i, _ in store.iter_scores()] == list(images)


def test_interrupted_inference_leaves_an_unusable_store(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ProbabilityWriter(tmp_path / "p.zarr", {"a": (2, 2), "b": (2, 2)}, num_classes=2, strategy="entropy") as writer:
            writer.write("a", np.full((2, 2, 2), 0.5), np.zeros((2, 2)))
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="incomplete"):
        ProbabilityStore(tmp_path / "p.zarr")


def test_missing_images_are_an_error_and_unknown_ids_are_named(tmp_path):
    with pytest.raises(RuntimeError, match="never written"):
        with ProbabilityWriter(tmp_path / "p.zarr", {"a": (2, 2), "b": (2, 2)}, num_classes=2, strategy="margin") as writer:
            writer.write("a", np.full((2, 2, 2), 0.5), np.zeros((2, 2)))
    with ProbabilityWriter(tmp_path / "q.zarr", {"a": (2, 2)}, num_classes=2, strategy="margin") as writer:
        writer.write("a", np.full((2, 2, 2), 0.5), np.zeros((2, 2)))
    with pytest.raises(KeyError, match="nope"):
        ProbabilityStore(tmp_path / "q.zarr").scores("nope")
