"""Seconds per training batch of a trained model with subnormal floats computed in full against flushed to zero
(`pixelpick.models.subnormals_flushed`, under which the query, train and evaluate steps run). Prints figures,
asserts nothing.

    python benchmarks/subnormals.py --model data/benchmarks/cpu/margin-s0/rounds/r03/model.pt

The model is a checkpoint of this project (a round's `model.pt`). A fresh network has no subnormals to speak of:
the slowdown shows in models trained for a while, such as the later rounds of the CamVid benchmark's `cpu` preset
(the bundled synthetic demo's small models show none). Each mode runs in its own process, because torch's worker
threads copy the flag when they start; each times forward and backward on random batches of the model's recorded
image size, in training mode, as a fine-tuning round runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def time_batches(model_path: str, flush: bool, batches: int, batch_size: int) -> float:
    import torch

    sys.path.insert(0, str(REPO))
    from pixelpick.checkpoints import model_from_checkpoint, read_checkpoint
    from pixelpick.models import subnormals_flushed

    with subnormals_flushed() if flush else contextlib.nullcontext():
        checkpoint = read_checkpoint(Path(model_path))
        model = model_from_checkpoint(checkpoint).to(memory_format=torch.channels_last).train()
        height, width = checkpoint.get("image_size") or (120, 160)
        images = torch.randn(batch_size, 3, height, width).to(memory_format=torch.channels_last)
        seconds = []
        for _ in range(batches + 2):  # the first two warm up
            started = time.perf_counter()
            model(images).float().mean().backward()
            model.zero_grad()
            seconds.append(time.perf_counter() - started)
    return sum(seconds[2:]) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a checkpoint (model.pt) of this project")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=["full", "flushed"], help=argparse.SUPPRESS)  # one measuring process
    args = parser.parse_args()
    if args.mode:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(time_batches(args.model, args.mode == "flushed", args.batches, args.batch_size)))
        return
    print(f"{args.model}: {args.batch_size} images per batch, {args.threads} threads")
    for mode in ("full", "flushed"):
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True,
                              text=True, check=True)
        seconds = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  subnormals {mode:8s} {seconds:6.3f} s per batch (forward and backward)")


if __name__ == "__main__":
    main()
