"""CPU cost of one training epoch and one inference pass over real CamVid train. Prints figures.

    python benchmarks/camvid_cost.py --camvid-root /path/to/camvid [--images 48]

Times `--images` images (default 48) and scales linearly to the 367 of CamVid train, for each working size
(360x480 native and 180x240) and model. Training uses 20 labelled pixels per image and the paper-camvid recipe's
augmentation; inference is one deterministic pass writing nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pixelpick.acquisition import random_pixels  # noqa: E402
from pixelpick.campaign import Campaign  # noqa: E402
from pixelpick.inference import predict_probabilities  # noqa: E402
from pixelpick.labels import label_frame  # noqa: E402
from pixelpick.recipe import TRAIN_STEP  # noqa: E402
from pixelpick.settings import load_settings  # noqa: E402
from pixelpick.training import fit  # noqa: E402


def random_labels(pool, image_ids: list[str], per_image: int) -> pd.DataFrame:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for image_id in image_ids:
        mask = pool.load_mask(image_id)
        for y, x in random_pixels(mask.shape, per_image, mask == pool.label_space.ignore_index, generator):
            rows.append((image_id, y, x, mask[y, x]))
    frame = pd.DataFrame(rows, columns=["image_id", "y", "x", "class_id"])
    n = len(frame)
    return label_frame({**{c: frame[c] for c in frame}, "round": np.zeros(n), "source": ["bench"] * n,
                        "annotator": ["bench"] * n, "seconds": np.zeros(n, np.float32),
                        "time": [pd.Timestamp(0, tz="UTC")] * n})


def measure(root: str, size: list[int] | None, arch: str, images: int) -> None:
    overrides = {"data.dataset": "camvid", "data.root": root, "data.image_size": size, "model.arch": arch,
                 "train.preset": "paper-camvid", "train.epochs": 1, "train.crop_size": None, "train.device": "cpu"}
    campaign = Campaign(load_settings(REPO / "params.yaml", overrides))
    pool = campaign.pool
    total = len(pool.image_ids)
    ids = pool.image_ids[:images]
    labels = random_labels(pool, ids, 20)
    model = TRAIN_STEP.prepare(campaign, 0).new_model()
    started = time.process_time(), time.perf_counter()
    fit(model, pool, labels, campaign.settings.train, torch.device("cpu"))
    train_cpu, train_wall = time.process_time() - started[0], time.perf_counter() - started[1]
    started = time.process_time(), time.perf_counter()
    for _ in predict_probabilities(model, pool, ids, torch.device("cpu")):
        pass
    infer_cpu, infer_wall = time.process_time() - started[0], time.perf_counter() - started[1]
    scale = total / len(ids)
    h, w = pool.image_size(ids[0])
    print(f"{h}x{w} {arch:26s} train epoch: {train_cpu * scale:7.0f} CPU s ({train_wall * scale:6.0f} s wall)   "
          f"inference pass: {infer_cpu * scale:6.0f} CPU s ({infer_wall * scale:5.0f} s wall)   "
          f"[{len(ids)} of {total} images timed, {torch.get_num_threads()} threads]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--camvid-root", default=os.environ.get("PIXELPICK_CAMVID_ROOT"))
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--archs", default="deeplabv3plus_mobilenetv2,lraspp_mobilenetv3")
    args = parser.parse_args()
    if not args.camvid_root:
        sys.exit("needs --camvid-root (or PIXELPICK_CAMVID_ROOT)")
    for size in (None, [180, 240]):
        for arch in args.archs.split(","):
            measure(args.camvid_root, size, arch, args.images)


if __name__ == "__main__":
    main()
