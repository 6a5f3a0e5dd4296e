"""The probability store: per-pixel class probabilities and acquisition scores in Zarr, one shard per image.

Layout of `<round>/probs.zarr` (Zarr v3):

    zarr.json                  group attributes: image_ids, rows (image id -> [size key, row]), num_classes,
                               strategy, key (what the store was computed from, given by the writer), complete
    probs/<H>x<W>              (N, C, H, W) float16 by default, zstd, one chunk (one file) per image
    scores/<H>x<W>             (N, H, W) float32, uncompressed, one chunk per image; higher = more informative
                               (see pixelpick.acquisition)
    <array>/c.<row>.0.0[.0]    the chunk files: the default chunk keys with "." separators, so all of an
                               array's chunks sit in its own folder

Images of one size share an array, one row and one chunk file each, so datasets whose images differ in size (VOC)
need no padding, and every image's chunk has exactly one writer: `ProbabilityWriter` funnels all writes through a
single background thread, which lets the next batch's forward pass overlap the previous batch's scoring,
compression and disk writes. Scores are stored uncompressed because selection reads every one of them and uncertainty
maps compress poorly; float32 keeps their ranking exact.

Because a chunk is exactly one image, the writer encodes each chunk itself (little-endian bytes, then the array's
zstd codec: what Zarr would write, byte for byte, as tests/test_probstore.py checks) and writes its file directly,
skipping Zarr's per-chunk machinery, which cost several times the encoding itself (each batch written through Zarr's
array API instead took about a quarter off inference's images/s on small images). Each chunk file is written
atomically, as Zarr's own local store writes: to a temporary file beside it (`.<chunk>.XXXXXXXX.tmp`), then renamed
over it, so a writer killed midway leaves the previous chunk or none, never part of one. Arrays with any other codec
or store fall back to ordinary Zarr writes. Reading is plain Zarr; `iter_scores` reads runs of rows in one call.
`damaged_images` and `missing_images` look at the stored files themselves, through fsspec (local or remote alike). A
store is usable only once `complete` is set; an interrupted inference is simply redone. Arrays are filled with NaN,
not zeros, so a chunk file that went missing can never pass for real probabilities: `missing_images` finds such
chunks, and NaN scores are refused by selection.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from pixelpick.errors import PixelPickError

# Every chunk ends with the CRC32C of its bytes, which Zarr checks on every read: a chunk zeroed, truncated or
# otherwise damaged on disk is refused, never read as probabilities or scores.
_COMPRESSORS = (ZstdCodec(level=1), Crc32cCodec())
_SCORE_CODECS = (Crc32cCodec(),)
# Chunk files named c.<row>.0.0... side by side in the array's folder: no directory to create per image.
_CHUNK_KEYS = {"name": "default", "separator": "."}
# iter_scores reads this many rows (at most this many bytes) per Zarr call: few calls, and memory stays flat.
_READ_ROWS, _READ_BYTES = 16, 32 * 2**20


def _size_key(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


class DamagedStoreError(PixelPickError):
    """A chunk of a probability store does not match its checksum (or cannot be decoded)."""


class ProbabilityStore:
    """Read access to a complete store (or, with `require_complete=False`, to the shards written so far)."""

    def __init__(self, location: str | Path, *, require_complete: bool = True) -> None:
        self.location = location
        self.path = _store_location(location)
        try:
            self.group = zarr.open_group(self.path, mode="r")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no probability store at {self.path}") from exc
        attrs = self.group.attrs
        if require_complete and not attrs.get("complete", False):
            raise RuntimeError(f"probability store {self.path} is incomplete (inference was interrupted): re-run it")
        self.key: str | None = attrs.get("key")
        self.image_ids: list[str] = list(attrs["image_ids"])
        self.strategy: str = attrs["strategy"]
        self.num_classes: int | None = attrs.get("num_classes")
        self._rows: dict[str, list] = dict(attrs["rows"])
        self._arrays: dict[str, zarr.Array] = {}
        self._files: tuple | None = None

    def _stored_files(self) -> tuple:
        """(fsspec filesystem, the store's folder on it): where its chunk files are read and listed directly."""
        if self._files is None:
            fs, path = _filesystem(self.location)
            self._files = fs, path.rstrip("/")
        return self._files

    def _array(self, kind: str, size_key: str) -> zarr.Array:
        name = f"{kind}/{size_key}"
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _read(self, kind: str, image_id: str) -> np.ndarray:
        if image_id not in self._rows:
            raise KeyError(f"image {image_id!r} is not in the probability store {self.path}")
        size_key, row = self._rows[image_id]
        try:
            return self._array(kind, size_key)[row]
        except ValueError as error:  # the checksum, or a chunk of the wrong size
            raise self._damaged(kind, image_id, error) from None

    def _damaged(self, kind: str, image_id: str, error: Exception) -> DamagedStoreError:
        size_key, row = self._rows[image_id]
        chunk = self._chunk_key(kind, size_key, row)
        return DamagedStoreError(f"probability store {self.path}: the {kind} chunk {chunk} of image {image_id!r} is "
                                 f"damaged ({str(error).splitlines()[0]}); re-run the step to recompute the store")

    def _chunk_key(self, kind: str, size_key: str, row: int) -> str:
        array = self._array(kind, size_key)
        return f"{kind}/{size_key}/" + array.metadata.encode_chunk_key((row,) + (0,) * (array.ndim - 1))

    def checksummed(self) -> bool:
        """Whether every chunk carries a checksum (stores written before checksums cannot be trusted by content)."""
        return all(any(isinstance(codec, Crc32cCodec) for codec in self.group[f"{kind}/{size_key}"].metadata.codecs)
                   for kind in ("probs", "scores") for size_key in {key for key, _ in self._rows.values()})

    def damaged_images(self) -> list[str]:
        """Images with a chunk missing or not matching its checksum, checked on the stored bytes (without
        decoding): what a step must recompute before it trusts the store."""
        fs, folder = self._stored_files()
        damaged = []
        for image_id in self.image_ids:
            size_key, row = self._rows[image_id]
            for kind in ("probs", "scores"):
                data = _read_file(fs, f"{folder}/{self._chunk_key(kind, size_key, row)}")
                if data is None or len(data) < 4 or _crc32c(data[:-4]) != data[-4:]:
                    damaged.append(image_id)
                    break
        return damaged

    def probs(self, image_id: str) -> np.ndarray:
        return self._read("probs", image_id)

    def missing_images(self) -> list[str]:
        """Images whose probability or score chunk is gone from the store (they would read back as NaN)."""
        fs, folder = self._stored_files()
        present: dict[tuple[str, str], set[str]] = {}
        missing = []
        for image_id in self.image_ids:
            size_key, row = self._rows[image_id]
            for kind in ("probs", "scores"):
                array = self._array(kind, size_key)
                if (kind, size_key) not in present:
                    present[kind, size_key] = _file_names(fs, f"{folder}/{kind}/{size_key}")
                chunk = array.metadata.encode_chunk_key((row,) + (0,) * (array.ndim - 1))
                if chunk not in present[kind, size_key]:
                    missing.append(image_id)
                    break
        return missing

    def scores(self, image_id: str) -> np.ndarray:
        return self._read("scores", image_id)

    def iter_scores(self) -> Iterator[tuple[str, np.ndarray]]:
        """Stream (image id, score map) in `image_ids` order. Runs of consecutive rows are read with one Zarr call
        (which fetches their chunks concurrently), at most 16 images or 32 MiB at a time, so memory stays flat as
        the pool grows."""
        run: list[str] = []
        for image_id in self.image_ids:
            if run:
                key, row = self._rows[image_id]
                first_key, first_row = self._rows[run[0]]
                height, width = map(int, key.split("x"))
                if (key != first_key or row != first_row + len(run) or len(run) == _READ_ROWS
                        or (len(run) + 1) * height * width * 4 > _READ_BYTES):
                    yield from self._read_run(run)
                    run = []
            run.append(image_id)
        if run:
            yield from self._read_run(run)

    def _read_run(self, image_ids: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        key, row = self._rows[image_ids[0]]
        try:
            block = self._array("scores", key)[row:row + len(image_ids)]
        except ValueError:  # read them one by one to name the damaged one
            block = [self._read("scores", image_id) for image_id in image_ids]
        yield from zip(image_ids, block)


def create_store(
    location: str | Path,
    image_sizes: Mapping[str, tuple[int, int]],
    num_classes: int,
    strategy: str,
    dtype: str = "float16",
    key: str | None = None,
) -> None:
    """Create an empty store for the pool `image_sizes` (image id -> (H, W)), replacing any store there.

    `location` is a local path or any fsspec URL (`s3://...`), so that writers on other machines can reach it.
    """
    group = zarr.open_group(_store_location(location), mode="w")
    by_size: dict[str, list[str]] = {}
    for image_id, size in image_sizes.items():
        by_size.setdefault(_size_key(size), []).append(image_id)
    rows = {image_id: [size_key, row] for size_key, ids in by_size.items() for row, image_id in enumerate(ids)}
    for size_key, ids in by_size.items():
        height, width = map(int, size_key.split("x"))
        for kind, shape, array_dtype, compressors in (
            ("probs", (num_classes, height, width), dtype, _COMPRESSORS),
            ("scores", (height, width), "float32", _SCORE_CODECS),
        ):
            zarr.create_array(group.store, name=f"{kind}/{size_key}", shape=(len(ids), *shape), chunks=(1, *shape),
                              dtype=array_dtype, compressors=compressors, fill_value=np.nan,
                              chunk_key_encoding=_CHUNK_KEYS)
    group.attrs.update({"image_ids": list(image_sizes), "rows": rows, "num_classes": num_classes,
                        "strategy": strategy, "key": key, "complete": False})


def mark_complete(location: str | Path) -> None:
    """Declare a store complete once every image's chunks are on disk (the writers of all shards are done)."""
    group = zarr.open_group(_store_location(location), mode="r+")
    group.attrs["complete"] = True
    missing = ProbabilityStore(location).missing_images()
    if missing:
        group.attrs["complete"] = False
        raise RuntimeError(f"{len(missing)} images of store {location} were never written, e.g. {missing[0]!r}")


def store_bytes(location: str | Path) -> int:
    """The bytes a store takes (0 when there is none)."""
    fs, path = _filesystem(location)
    return int(fs.du(path)) if fs.exists(path) else 0


def remove_store(location: str | Path) -> bool:
    """Delete a store; True if there was one. A deleted store is regenerated from its round's model when needed."""
    fs, path = _filesystem(location)
    if not fs.exists(path):
        return False
    fs.rm(path, recursive=True)
    return True


def _filesystem(location: str | Path):
    import fsspec

    return fsspec.core.url_to_fs(str(location))


def _store_location(location: str | Path) -> str | Path:
    """A local path as a Path (Zarr's LocalStore), a URL as it is (fsspec)."""
    text = str(location)
    return text if "://" in text and not text.startswith("file://") else Path(text.removeprefix("file://"))


class ProbabilityWriter:
    """Writes images into a store; use as a context manager.

    Given the pool (`image_sizes`, `num_classes`, `strategy`) it creates the store, writes every image and marks
    the store complete at the end of the `with` block: one writer for the whole pool. Given only `images`, it
    writes those images into an existing store (`create_store`) and leaves completion to whoever wrote the other
    shards (`mark_complete`): every image is one chunk, so writers of disjoint shards never touch the same chunk.

    `compute_seconds` and `write_seconds` add up the writer thread's time in queued computations (scoring) and in
    encoding and writing chunks; read them after the `with` block.
    """

    def __init__(
        self,
        location: str | Path,
        image_sizes: Mapping[str, tuple[int, int]] | None = None,
        num_classes: int | None = None,
        strategy: str | None = None,
        dtype: str = "float16",
        key: str | None = None,
        *,
        images: Sequence[str] | None = None,
    ) -> None:
        self.location = location
        self._owns_store = image_sizes is not None
        if self._owns_store:
            create_store(location, image_sizes, num_classes, strategy, dtype, key)
        self.group = zarr.open_group(_store_location(location), mode="r+")
        self._rows: dict[str, list] = dict(self.group.attrs["rows"])
        self.image_ids = list(images) if images is not None else list(self.group.attrs["image_ids"])
        self._chunk_writers = {
            (kind, size_key): _chunk_writer(self.group[f"{kind}/{size_key}"])
            for kind in ("probs", "scores") for size_key in {key for key, _ in self._rows.values()}
        }
        self._written: set[str] = set()
        self.compute_seconds = 0.0
        self.write_seconds = 0.0
        # One thread = one writer per chunk, and a bounded backlog keeps memory flat.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer")
        self._pending: list[Future] = []

    def write(self, image_id: str, probs: np.ndarray, scores: np.ndarray) -> None:
        """Queue one image's (C, H, W) probabilities and (H, W) scores for writing."""
        self.write_batch([image_id], np.asarray(probs)[None], np.asarray(scores)[None])

    def write_batch(self, image_ids: Sequence[str], probs: np.ndarray, scores: np.ndarray) -> None:
        """Queue a batch's (N, C, H, W) probabilities and (N, H, W) scores, row i for `image_ids[i]`."""
        self.write_computed_batch(image_ids, lambda: (probs, scores))

    def write_computed_batch(
        self, image_ids: Sequence[str], compute: Callable[[], tuple[np.ndarray, np.ndarray]]
    ) -> None:
        """Queue `compute() -> (probs[N, C, H, W], scores[N, H, W])` and the writes of its N images: both run on
        the writer thread, in queue order, so work that releases the GIL (scoring, compression, file writes)
        overlaps the caller's next forward pass."""
        image_ids = list(image_ids)
        for image_id in image_ids:
            if image_id not in self._rows:
                raise KeyError(f"image {image_id!r} is not in this store's pool")
        # Raised only if a caller mixes up shards: two writers must never share a chunk.
        if not set(image_ids) <= set(self.image_ids):
            raise KeyError(f"images {sorted(set(image_ids) - set(self.image_ids))[:3]} belong to another shard")
        self._pending.append(self._pool.submit(self._write, image_ids, compute))
        self._written.update(image_ids)
        while len(self._pending) > 2:
            self._pending.pop(0).result()

    def drain(self) -> None:
        """Wait until every queued computation and write has finished (and raise the first error)."""
        while self._pending:
            self._pending.pop(0).result()

    def _write(self, image_ids: list[str], compute: Callable[[], tuple[np.ndarray, np.ndarray]]) -> None:
        start = time.perf_counter()
        probs, scores = compute()
        written = time.perf_counter()
        self.compute_seconds += written - start
        if len(probs) != len(image_ids) or len(scores) != len(image_ids):
            raise ValueError(f"{len(image_ids)} images but {len(probs)} probability and {len(scores)} score maps")
        for image_id, image_probs, image_scores in zip(image_ids, probs, scores):
            key, row = self._rows[image_id]
            self._chunk_writers["probs", key](row, image_probs)
            self._chunk_writers["scores", key](row, image_scores)
        self.write_seconds += time.perf_counter() - written

    def __enter__(self) -> ProbabilityWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pool.shutdown(wait=True)
        if exc_type is None:
            missing = set(self.image_ids) - self._written
            if missing:
                raise RuntimeError(f"{len(missing)} images were never written, e.g. {sorted(missing)[0]!r}")
            if self._owns_store:
                self.group.attrs["complete"] = True


def _chunk_writer(array: zarr.Array) -> Callable[[int, np.ndarray], None]:
    """`write(row, image)`: store one image as the chunk at `row` of a (N, ...) array chunked one image per chunk.

    For a local store and the codecs this module creates (little-endian bytes, optionally zstd, then crc32c), the
    chunk is encoded here and written as one file, atomically (`_replace_file`), exactly as Zarr would write it;
    anything else goes through Zarr.
    """
    codecs = array.metadata.codecs
    store = array.store_path.store
    chunk_shape = array.metadata.chunk_grid.chunk_shape
    direct = (
        isinstance(store, LocalStore)
        and tuple(chunk_shape) == (1, *array.shape[1:])
        and isinstance(codecs[0], BytesCodec)
        and (codecs[0].endian is None or codecs[0].endian.value == "little")
        and [type(codec) for codec in codecs[1:]] in ([], [ZstdCodec], [Crc32cCodec], [ZstdCodec, Crc32cCodec])
    )
    if not direct:

        def write_through_zarr(row: int, image: np.ndarray) -> None:
            array[row] = image

        return write_through_zarr
    dtype = array.dtype.newbyteorder("<")
    zstd = next((codec for codec in codecs[1:] if isinstance(codec, ZstdCodec)), None)
    compressor = Zstd(level=zstd.level, checksum=zstd.checksum) if zstd is not None else None
    checksum = isinstance(codecs[-1], Crc32cCodec)
    folder = Path(store.root) / array.store_path.path
    ndim = len(chunk_shape)
    made: set[Path] = set()

    def write_directly(row: int, image: np.ndarray) -> None:
        data = np.ascontiguousarray(image, dtype=dtype)
        if data.shape != tuple(chunk_shape[1:]):
            raise ValueError(f"expected an image of shape {tuple(chunk_shape[1:])}, got {data.shape}")
        encoded = compressor.encode(data) if compressor is not None else data.tobytes()
        if checksum:
            encoded = bytes(encoded) + _crc32c(encoded)
        path = folder / array.metadata.encode_chunk_key((row,) + (0,) * (ndim - 1))
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        _replace_file(path, encoded)

    return write_directly


def _replace_file(path: Path, data) -> None:
    """Write `data` as the file `path` atomically: into a temporary file beside it, then renamed over it, so that a
    writer killed midway leaves the previous file (or none), never part of one. The temporary file is named as
    `pixelpick.io.atomic_write` names its own (`.<name>.XXXXXXXX.tmp`) and removed if the write fails. Unlike
    `atomic_write` there is no fsync (nor has Zarr's local store one): a chunk lost to a power cut is caught by its
    checksum, and the store recomputed."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    file = open(temporary, "xb")  # never another writer's file: only a file created here is removed below
    try:
        with file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _crc32c(data) -> bytes:
    """The checksum as Zarr's crc32c codec appends it (a native-order uint32)."""
    return np.uint32(google_crc32c.value(bytes(data))).tobytes()


def _read_file(fs, path: str) -> bytes | None:
    """The bytes of the file at `path` on the fsspec filesystem `fs`, or None when there is none."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _file_names(fs, folder: str) -> set[str]:
    """The names of the entries of `folder` on the fsspec filesystem `fs` (none if it does not exist), listed afresh:
    other processes (the writers of other shards) may have written there since this process last looked."""
    fs.invalidate_cache(folder)
    try:
        return {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(folder, detail=False)}
    except FileNotFoundError:
        return set()
