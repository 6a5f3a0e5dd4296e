"""A round's pool, frozen: the images a round drew from, as they were when it started.

A campaign's folder of photos grows while the campaign runs. When a round starts, its pool manifest
`pools/rNN.csv` records every image of the pool: its id, the md5 of its file (and of its mask, where the campaign
reads masks), its height and width, and `since`: the round from which the image has been in the pool as it is now
(the round it arrived, or last changed). Every step of the round works on exactly those images and depends on that file,
not on the folder, so photos added later join at the next round and earlier rounds stay reproducible while the
folder grows. The manifest is history: written once, never recomputed, committed with the campaign's records.

A photo that an earlier round drew from and that has since changed or disappeared is reported, in one line, when the
next round starts. Its earlier labels leave training from that round on (they describe pixels that are no longer
there); the round's train record counts them. A changed photo is a new image to the rounds that follow. So a label
made in round k is current while its image is in the pool with `since` <= k: training reads its own round's
manifest, and no earlier one.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pixelpick.datasets.base import SegmentationDataset
from pixelpick.digests import file_md5
from pixelpick.errors import DatasetError
from pixelpick.io import atomic_write

log = logging.getLogger(__name__)

COLUMNS = ["image_id", "md5", "mask_md5", "height", "width", "since"]
# Manifests written before `since` existed; it is filled on reading from the earlier rounds' manifests.
UNDATED_COLUMNS = COLUMNS[:-1]


class PoolChangedError(DatasetError):
    """An image of a round's frozen pool is no longer what the round drew from; the message names it."""


def describe_pool(dataset: SegmentationDataset, *, with_masks: bool) -> pd.DataFrame:
    """One row per image of `dataset`: id, file md5, mask md5 (empty without masks or when not read), size (no
    `since` yet: `date`)."""
    rows = []
    for image_id in dataset.image_ids:
        mask = dataset.mask_path(image_id) if with_masks else None
        height, width = dataset.image_size(image_id)
        rows.append((image_id, file_md5(dataset.image_path(image_id)), file_md5(mask) if mask else "", height, width))
    return pd.DataFrame(rows, columns=UNDATED_COLUMNS)


def date(current: pd.DataFrame, previous: pd.DataFrame | None, round_id: int) -> pd.DataFrame:
    """`current` with its `since` column: an image as it was in the previous round's pool keeps its `since`; one
    new or changed is current from `round_id`. Without a previous manifest (round 0, or a campaign that started
    before pools were frozen) every image counts as current from round 0: there is nothing to compare with."""
    if previous is None:
        return current.assign(since=0)
    content = previous["md5"] + previous["mask_md5"]
    kept = dict(zip(previous["image_id"] + "\0" + content, previous["since"]))
    keys = current["image_id"] + "\0" + current["md5"] + current["mask_md5"]
    return current.assign(since=[int(kept.get(key, round_id)) for key in keys])


def read_manifest(path: Path) -> pd.DataFrame:
    """The manifest at `path`; one written before `since` existed comes without that column (`date` fills it)."""
    try:
        manifest = pd.read_csv(path, dtype={"image_id": str, "md5": str, "mask_md5": str}, keep_default_na=False)
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read the pool manifest {path}: {error}") from None
    if list(manifest.columns) not in (COLUMNS, UNDATED_COLUMNS):
        raise DatasetError(f"{path} is not a pool manifest: its columns are {list(manifest.columns)}, not {COLUMNS}")
    return manifest


def write_manifest(manifest: pd.DataFrame, path: Path) -> Path:
    text = io.StringIO()
    manifest[COLUMNS].to_csv(text, index=False, lineterminator="\n")
    return atomic_write(path, lambda f: f.write(text.getvalue().encode()))


@dataclass(frozen=True)
class PoolChange:
    """How a round's pool differs from the previous round's."""

    added: list[str]
    changed: list[str]
    removed: list[str]

    def describe(self, round_id: int, labelled: dict[str, list[int]]) -> str:
        """One line: what changed since the previous round, and which rounds had labelled the changed photos."""
        parts = [f"round {round_id}'s pool: {len(self.added)} new image(s)"]
        for what, ids in (("changed", self.changed), ("removed", self.removed)):
            if ids:
                named = ", ".join(f"{i}" + (f" (labelled in rounds {_rounds(labelled[i])})" if labelled.get(i) else "")
                                  for i in ids[:5])
                more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
                parts.append(f"{len(ids)} {what} since the previous round: {named}{more}")
        if self.changed or self.removed:
            parts.append("their earlier labels leave training from this round on")
        return "; ".join(parts)


def _rounds(rounds: list[int]) -> str:
    return ", ".join(str(r) for r in sorted(set(rounds)))


def compare(previous: pd.DataFrame, current: pd.DataFrame) -> PoolChange:
    old = dict(zip(previous["image_id"], previous["md5"] + previous["mask_md5"]))
    new = dict(zip(current["image_id"], current["md5"] + current["mask_md5"]))
    return PoolChange(added=sorted(new.keys() - old.keys()), removed=sorted(old.keys() - new.keys()),
                      changed=sorted(i for i in old.keys() & new.keys() if old[i] != new[i]))


def check_unchanged(dataset: SegmentationDataset, manifest: pd.DataFrame, round_id: int, *, with_masks: bool) -> None:
    """PoolChangedError, naming the first image, unless every image of the manifest is still as recorded."""
    for row in manifest.itertuples(index=False):
        try:
            path = dataset.image_path(row.image_id)
        except DatasetError:
            raise PoolChangedError(f"image {row.image_id!r} of round {round_id}'s pool is gone: the round cannot be "
                                   "reproduced without it (restore it, or start a new round)") from None
        mask = dataset.mask_path(row.image_id) if with_masks else None
        if file_md5(path) != row.md5 or (mask and file_md5(mask)) != (row.mask_md5 or None):
            raise PoolChangedError(f"image {row.image_id!r} has changed since round {round_id} drew it: the round "
                                   "cannot be reproduced from it (restore it, or start a new round)")


def stale_labels(labels: pd.DataFrame, manifest: pd.DataFrame) -> pd.Series:
    """True for each label whose image is no longer, in the (dated) pool `manifest`, what it was when it was
    labelled: removed since, or changed after the label's round. Training must not pair such a label with today's
    pixels."""
    since = dict(zip(manifest["image_id"], manifest["since"]))
    return pd.Series([i not in since or since[i] > r for i, r in zip(labels["image_id"], labels["round"])],
                     index=labels.index, dtype=bool)
