"""The probability store: per-pixel class probabilities and acquisition scores in Zarr, one shard per image.

Layout of `<round>/probs.zarr` (Zarr v3):

    zarr.json                  group attributes: image_ids, rows (image id -> [size key, row]), num_classes,
                               strategy, complete
    probs/<H>x<W>              (N, C, H, W) float16 by default, zstd, one chunk (one file) per image
    scores/<H>x<W>             (N, H, W) float32, zstd; higher = more informative (see pixelpick.acquisition)

Images of one size share an array, one row and one chunk file each, so datasets whose images differ in size (VOC)
need no padding, and every image's chunk has exactly one writer: `ProbabilityWriter` funnels all writes through a
single background thread, which lets the next image's forward pass overlap the previous image's compression and
disk write.
A store is usable only once `complete` is set; an interrupted inference is simply redone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

_COMPRESSORS = (ZstdCodec(level=1),)


def _size_key(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


class ProbabilityStore:
    """Read access to a complete store."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.group = zarr.open_group(self.path, mode="r")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no probability store at {self.path}") from exc
        attrs = self.group.attrs
        if not attrs.get("complete", False):
            raise RuntimeError(f"probability store {self.path} is incomplete (inference was interrupted): re-run it")
        self.image_ids: list[str] = list(attrs["image_ids"])
        self.strategy: str = attrs["strategy"]
        self._rows: dict[str, list] = dict(attrs["rows"])
        self._arrays: dict[str, zarr.Array] = {}

    def _read(self, kind: str, image_id: str) -> np.ndarray:
        if image_id not in self._rows:
            raise KeyError(f"image {image_id!r} is not in the probability store {self.path}")
        size_key, row = self._rows[image_id]
        name = f"{kind}/{size_key}"
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name][row]

    def probs(self, image_id: str) -> np.ndarray:
        return self._read("probs", image_id)

    def scores(self, image_id: str) -> np.ndarray:
        return self._read("scores", image_id)

    def iter_scores(self) -> Iterator[tuple[str, np.ndarray]]:
        """Stream (image id, score map) one image at a time: memory stays flat as the pool grows."""
        for image_id in self.image_ids:
            yield image_id, self.scores(image_id)


class ProbabilityWriter:
    """Writes a new store; use as a context manager. `complete` is set only when every image was written."""

    def __init__(
        self,
        path: str | Path,
        image_sizes: Mapping[str, tuple[int, int]],
        num_classes: int,
        strategy: str,
        dtype: str = "float16",
    ) -> None:
        self.path, self.image_ids = Path(path), list(image_sizes)
        self.group = zarr.open_group(self.path, mode="w")
        by_size: dict[str, list[str]] = {}
        for image_id, size in image_sizes.items():
            by_size.setdefault(_size_key(size), []).append(image_id)
        self._rows = {image_id: [key, row] for key, ids in by_size.items() for row, image_id in enumerate(ids)}
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        for key, ids in by_size.items():
            height, width = map(int, key.split("x"))
            for kind, shape, array_dtype in (("probs", (num_classes, height, width), dtype),
                                             ("scores", (height, width), "float32")):
                self._arrays[kind, key] = zarr.create_array(
                    self.group.store, name=f"{kind}/{key}", shape=(len(ids), *shape), chunks=(1, *shape),
                    dtype=array_dtype, compressors=_COMPRESSORS, fill_value=0,
                )
        self.group.attrs.update({"image_ids": self.image_ids, "rows": self._rows, "num_classes": num_classes,
                                 "strategy": strategy, "complete": False})
        self._written: set[str] = set()
        # One thread = one writer per shard, and a bounded backlog keeps memory flat.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer")
        self._pending: list[Future] = []

    def write(self, image_id: str, probs: np.ndarray, scores: np.ndarray) -> None:
        """Queue one image's (C, H, W) probabilities and (H, W) scores for writing."""
        self.write_computed(image_id, lambda: (probs, scores))

    def write_computed(self, image_id: str, compute: Callable[[], tuple[np.ndarray, np.ndarray]]) -> None:
        """Queue `compute() -> (probs, scores)` and its write: both run on the writer thread, in queue order, so
        work that releases the GIL (torch scoring, compression) overlaps the caller's next forward pass."""
        key, row = self._rows[image_id]
        self._pending.append(self._pool.submit(self._write, key, row, compute))
        self._written.add(image_id)
        while len(self._pending) > 2:
            self._pending.pop(0).result()

    def _write(self, key: str, row: int, compute: Callable[[], tuple[np.ndarray, np.ndarray]]) -> None:
        probs, scores = compute()
        self._arrays["probs", key][row] = probs
        self._arrays["scores", key][row] = scores

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
            self.group.attrs["complete"] = True
