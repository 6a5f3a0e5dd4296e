"""Seconds per training epoch on this machine: float32 against bfloat16 autocast, with and without channels-last,
and the cost of decoding images every epoch. Prints figures, asserts nothing (docs/benchmarks/README.md has them).

    python benchmarks/training_speed.py --camvid-root /path/to/camvid              # the cpu preset's size
    python benchmarks/training_speed.py --camvid-root /path/to/camvid --miou 10    # and mIoU after 10 epochs

Each variant trains LR-ASPP MobileNetV3 at 120x160 on 20 random labelled pixels per CamVid training image, with the
same seed; batches are prepared once, so the timing is the model's alone. `--miou E` also trains E epochs of the
float32 and the adopted variant end to end and evaluates both on val.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pixelpick.datasets import CamVidDataset  # noqa: E402
from pixelpick.models import build_model  # noqa: E402
from pixelpick.training import LabelledImages  # noqa: E402
from pixelpick.transforms import TrainTransform, collate_sparse, sparse_cross_entropy  # noqa: E402

VARIANTS = {  # name: (autocast dtype, channels-last)
    "float32": (None, False),
    "float32 + channels-last": (None, True),
    "bfloat16 autocast": (torch.bfloat16, False),
    "bfloat16 autocast + channels-last": (torch.bfloat16, True),
}


def random_labels(dataset: CamVidDataset, per_image: int = 20, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    height, width = dataset.working_size
    for image_id in dataset.image_ids:
        flat = rng.choice(height * width, per_image, replace=False)
        ys, xs = flat // width, flat % width
        classes = dataset.load_mask(image_id)[ys, xs]
        rows += [(image_id, y, x, c) for y, x, c in zip(ys, xs, classes) if c != dataset.label_space.ignore_index]
    return pd.DataFrame(rows, columns=["image_id", "y", "x", "class_id"])


def epoch_seconds(batches: list[dict], dtype, channels_last: bool, epochs: int) -> tuple[list[float], torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenetv3", 11)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        for batch in batches:
            images = batch["image"].contiguous(memory_format=torch.channels_last) if channels_last else batch["image"]
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                logits = model(images)
            loss = sparse_cross_entropy(logits.float(), batch["points"], batch["point_labels"], 11)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - started)
    return seconds, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--camvid-root", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per variant (the first is a warm-up)")
    parser.add_argument("--miou", type=int, default=0, metavar="EPOCHS")
    args = parser.parse_args()
    pool = CamVidDataset(args.camvid_root, "train", image_size=(120, 160))
    space = pool.label_space
    transform = TrainTransform(crop_size=(120, 160), scale_range=(0.75, 1.25), photometric=False, mean=space.mean,
                               std=space.std, ignore_index=space.ignore_index)
    labels = random_labels(pool)

    def loader(images: LabelledImages) -> DataLoader:
        return DataLoader(images, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0),
                          collate_fn=partial(collate_sparse, ignore_index=space.ignore_index))

    for name, cache in (("decoding every epoch", 0), ("decoded once (cached)", 1 << 30)):
        images = LabelledImages(pool, transform, labels, cache_bytes=cache)
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            list(loader(images))
            timings.append(time.perf_counter() - started)
        print(f"data, {name:<24}: {timings[-1]:.1f} s per epoch", flush=True)
    batches = list(loader(LabelledImages(pool, transform, labels)))
    for name, (dtype, channels_last) in VARIANTS.items():
        seconds, _ = epoch_seconds(batches, dtype, channels_last, args.epochs)
        print(f"model, {name:<33}: {np.mean(seconds[1:]):.1f} s per epoch "
              f"(runs: {', '.join(f'{s:.1f}' for s in seconds)}; {torch.get_num_threads()} threads)", flush=True)
    if args.miou:
        from pixelpick.training import evaluate

        val = CamVidDataset(args.camvid_root, "val", image_size=(120, 160))
        for name in ("float32", "float32 + channels-last", "bfloat16 autocast"):
            seconds, model = epoch_seconds(batches, *VARIANTS[name], args.miou)
            miou = evaluate(model, val, torch.device("cpu"))["miou"]
            print(f"mIoU after {args.miou} epochs, {name}: {100 * miou:.2f} ({sum(seconds):.0f} s)", flush=True)


if __name__ == "__main__":
    main()
