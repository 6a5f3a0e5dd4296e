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
        with ProbabilityWriter(tmp_path / "p.zarr", {"a": (2, 2), "b": (2, 2)}, num_classes=2,
                               strategy="entropy") as writer:
            writer.write("a", np.full((2, 2, 2), 0.5), np.zeros((2, 2)))
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="incomplete"):
        ProbabilityStore(tmp_path / "p.zarr")


def test_missing_images_are_an_error_and_unknown_ids_are_named(tmp_path):
    with pytest.raises(RuntimeError, match="never written"):
        with ProbabilityWriter(tmp_path / "p.zarr", {"a": (2, 2), "b": (2, 2)}, num_classes=2,
                               strategy="margin") as writer:
            writer.write("a", np.full((2, 2, 2), 0.5), np.zeros((2, 2)))
    with ProbabilityWriter(tmp_path / "q.zarr", {"a": (2, 2)}, num_classes=2, strategy="margin") as writer:
        writer.write("a", np.full((2, 2, 2), 0.5), np.zeros((2, 2)))
    with pytest.raises(KeyError, match="nope"):
        ProbabilityStore(tmp_path / "q.zarr").scores("nope")


def test_chunks_are_the_files_zarr_itself_would_write(tmp_path):
    """The writer encodes chunks itself; each file must be byte for byte what Zarr writes for that row."""
    import zarr

    from pixelpick.probstore import _CHUNK_KEYS, _COMPRESSORS, _SCORE_CODECS

    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=(3, 6, 5)).transpose(0, 3, 1, 2).astype(np.float32)
    scores = rng.random((3, 6, 5)).astype(np.float32)
    with ProbabilityWriter(tmp_path / "ours.zarr", {f"{i}.png": (6, 5) for i in range(3)}, num_classes=4,
                           strategy="margin") as writer:
        writer.write_batch([f"{i}.png" for i in range(3)], probs, scores)
    reference = zarr.open_group(tmp_path / "zarr.zarr", mode="w")
    arrays = (("probs", probs, "float16", _COMPRESSORS), ("scores", scores, "float32", _SCORE_CODECS))
    for kind, data, dtype, compressors in arrays:
        array = zarr.create_array(reference.store, name=f"{kind}/6x5", shape=data.shape, chunks=(1, *data.shape[1:]),
                                  dtype=dtype, compressors=compressors, fill_value=np.nan,
                                  chunk_key_encoding=_CHUNK_KEYS)
        array[:] = data.astype(dtype)
        for row in range(3):
            key = array.metadata.encode_chunk_key((row,) + (0,) * (data.ndim - 1))
            ours = (tmp_path / "ours.zarr" / kind / "6x5" / key).read_bytes()
            assert ours == (tmp_path / "zarr.zarr" / kind / "6x5" / key).read_bytes(), (kind, row)
    assert ProbabilityStore(tmp_path / "ours.zarr").group["scores/6x5"].metadata.codecs == array.metadata.codecs


def test_batches_of_rows_read_back_in_order_across_sizes(tmp_path, monkeypatch):
    import pixelpick.probstore as probstore

    monkeypatch.setattr(probstore, "_READ_ROWS", 3)  # several reads per run of rows
    rng = np.random.default_rng(2)
    sizes = {f"{i:02d}.png": (4, 5) if i % 7 else (2, 3) for i in range(20)}  # runs broken by another size
    expected = {}
    with ProbabilityWriter(tmp_path / "p.zarr", sizes, num_classes=2, strategy="entropy") as writer:
        for image_id, (h, w) in sizes.items():
            p = rng.random((h, w)).astype(np.float32)
            expected[image_id] = rng.random((h, w)).astype(np.float32)
            writer.write(image_id, np.stack([p, 1 - p]), expected[image_id])
    assert writer.write_seconds > 0
    store = ProbabilityStore(tmp_path / "p.zarr")
    streamed = list(store.iter_scores())
    assert [i for i, _ in streamed] == list(sizes)
    for image_id, scores in streamed:
        np.testing.assert_array_equal(scores, expected[image_id])
        np.testing.assert_array_equal(store.scores(image_id), expected[image_id])


def test_a_batch_of_the_wrong_length_or_shape_fails_the_store(tmp_path):
    with pytest.raises(ValueError, match="2 images"):
        with ProbabilityWriter(tmp_path / "p.zarr", {"a": (2, 2), "b": (2, 2)}, num_classes=2, strategy="margin") as w:
            w.write_batch(["a", "b"], np.full((1, 2, 2, 2), 0.5), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="shape"):
        with ProbabilityWriter(tmp_path / "q.zarr", {"a": (2, 2)}, num_classes=2, strategy="margin") as w:
            w.write("a", np.full((2, 3, 3), 0.5), np.zeros((2, 2)))
    with pytest.raises(KeyError, match="nope"):
        with ProbabilityWriter(tmp_path / "r.zarr", {"a": (2, 2)}, num_classes=2, strategy="margin") as w:
            w.write("nope", np.full((2, 2, 2), 0.5), np.zeros((2, 2)))


def test_a_missing_chunk_reads_as_nan_and_is_reported_never_as_zeros(tmp_path):
    with ProbabilityWriter(tmp_path / "p.zarr", {"a": (2, 3), "b": (2, 3)}, num_classes=2, strategy="margin",
                           key="k1") as writer:
        for image_id in ("a", "b"):
            writer.write(image_id, np.full((2, 2, 3), 0.5), np.ones((2, 3)))
    store = ProbabilityStore(tmp_path / "p.zarr")
    assert store.key == "k1" and store.missing_images() == []
    next((tmp_path / "p.zarr" / "scores").rglob("c.1.*")).unlink()
    store = ProbabilityStore(tmp_path / "p.zarr")
    assert store.missing_images() == ["b"]
    assert np.isnan(store.scores("b")).all()


def test_a_chunk_write_interrupted_midway_leaves_the_previous_chunk_or_none(tmp_path, monkeypatch):
    """A writer that dies halfway through a chunk's bytes leaves the chunk as it was (or absent), never torn."""
    import builtins

    import pixelpick.probstore as probstore

    class DiesHalfway:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(bytes(data)[: len(data) // 2])
            self.file.flush()
            raise OSError("killed midway")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    with ProbabilityWriter(tmp_path / "p.zarr", {"a": (4, 5), "b": (4, 5)}, num_classes=2, strategy="margin") as w:
        w.write("a", np.full((2, 4, 5), 0.25), np.ones((4, 5)))
        w.write("b", np.full((2, 4, 5), 0.25), np.ones((4, 5)))
    folder = tmp_path / "p.zarr" / "probs" / "4x5"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    (folder / "c.1.0.0.0").unlink()  # image b's chunk is gone: its rewrite must not leave a torn one
    monkeypatch.setattr(probstore, "open", lambda *args: DiesHalfway(builtins.open(*args)), raising=False)
    for image_id in ("a", "b"):
        with pytest.raises(OSError, match="killed midway"):
            with ProbabilityWriter(tmp_path / "p.zarr", images=[image_id]) as w:
                w.write(image_id, np.full((2, 4, 5), 0.75), np.zeros((4, 5)))
    del before["c.1.0.0.0"]
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # no temporary file left either
    store = ProbabilityStore(tmp_path / "p.zarr")
    assert store.missing_images() == ["b"] and store.damaged_images() == ["b"]
    np.testing.assert_array_equal(store.probs("a"), np.full((2, 4, 5), 0.25))


def test_missing_and_damaged_chunks_are_found_in_a_store_behind_a_url(tmp_path):
    """Stores on other machines (fsspec URLs) are checked through fsspec, as local ones are."""
    import fsspec

    url = f"memory://{tmp_path.name}/p.zarr"
    with ProbabilityWriter(url, {"a": (2, 3), "b": (2, 3), "c": (2, 3)}, num_classes=2, strategy="margin") as w:
        for image_id in ("a", "b", "c"):
            w.write(image_id, np.full((2, 2, 3), 0.5), np.ones((2, 3)))
    store = ProbabilityStore(url)
    assert store.missing_images() == [] and store.damaged_images() == []
    fs = fsspec.filesystem("memory")
    fs.rm(f"/{tmp_path.name}/p.zarr/scores/2x3/c.1.0.0")
    fs.pipe_file(f"/{tmp_path.name}/p.zarr/probs/2x3/c.2.0.0.0", b"\0" * 16)
    assert store.missing_images() == ["b"] and store.damaged_images() == ["b", "c"]
    fs.rm(f"/{tmp_path.name}", recursive=True)
