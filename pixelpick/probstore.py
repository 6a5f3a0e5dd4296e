"""The probability store: per-pixel class probabilities and acquisition scores in Zarr, one shard per image.

Layout of `<round>/probs.zarr` (Zarr v3):

    zarr.json                  group attributes: image_ids (index -> id), num_classes, strategy, complete
    probs/<index>              (C, H, W) float16 by default, zstd; the whole array is one shard
    scores/<index>             (H, W) float32, zstd; higher = more informative (see pixelpick.acquisition)

Images are arrays of their own, so datasets whose images differ in size (VOC) need no padding, and every image's
shard has exactly one writer: `ProbabilityWriter` funnels all writes through a single background thread, which
lets the next image's forward pass overlap the previous image's compression and disk write.
A store is usable only once `complete` is set; an interrupted inference is simply redone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

_COMPRESSORS = (ZstdCodec(level=1),)


def _key(index: int) -> str:
    return f"{index:06d}"


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
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def _array(self, kind: str, image_id: str) -> zarr.Array:
        if image_id not in self._index:
            raise KeyError(f"image {image_id!r} is not in the probability store {self.path}")
        return self.group[f"{kind}/{_key(self._index[image_id])}"]

    def probs(self, image_id: str) -> np.ndarray:
        return self._array("probs", image_id)[...]

    def scores(self, image_id: str) -> np.ndarray:
        return self._array("scores", image_id)[...]

    def iter_scores(self) -> Iterator[tuple[str, np.ndarray]]:
        """Stream (image id, score map) one image at a time: memory stays flat as the pool grows."""
        for image_id in self.image_ids:
            yield image_id, self.scores(image_id)


class ProbabilityWriter:
    """Writes a new store; use as a context manager. `complete` is set only when every image was written."""

    def __init__(
        self,
        path: str | Path,
        image_ids: Sequence[str],
        num_classes: int,
        strategy: str,
        dtype: str = "float16",
    ) -> None:
        self.path, self.image_ids, self.dtype = Path(path), list(image_ids), np.dtype(dtype)
        self.group = zarr.open_group(self.path, mode="w")
        self.group.attrs.update(
            {"image_ids": self.image_ids, "num_classes": num_classes, "strategy": strategy, "complete": False}
        )
        self.group.create_group("probs")
        self.group.create_group("scores")
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self._written: set[str] = set()
        # One thread = one writer per shard, and a bounded backlog keeps memory flat.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer")
        self._pending: list[Future] = []

    def write(self, image_id: str, probs: np.ndarray, scores: np.ndarray) -> None:
        """Queue one image's (C, H, W) probabilities and (H, W) scores for writing."""
        key = _key(self._index[image_id])
        self._pending.append(self._pool.submit(self._write, key, probs, scores))
        self._written.add(image_id)
        while len(self._pending) > 2:
            self._pending.pop(0).result()

    def _write(self, key: str, probs: np.ndarray, scores: np.ndarray) -> None:
        for kind, array, dtype in (("probs", probs, self.dtype), ("scores", scores, np.float32)):
            zarr.create_array(
                self.group.store,
                name=f"{kind}/{key}",
                data=np.ascontiguousarray(array, dtype=dtype),
                chunks=array.shape,
                compressors=_COMPRESSORS,
                overwrite=True,
            )

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
