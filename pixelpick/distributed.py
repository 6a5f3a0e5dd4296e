"""Data-parallel training with torch DDP: one process per GPU (or, on CPU, per process group member with gloo).

`train.processes: N` (N > 1) makes a round's training run as N processes started by torchrun on this machine
(`launch`, each process running `pixelpick.ddp_worker` on the train step's own input). Several machines run the
round's train step under torchrun themselves: `torchrun --nnodes ... -m flows.cli step train --round N
--campaign-dir DIR`.

Each process trains on its share of the images (a DistributedSampler draws a permutation of every image per epoch,
as one process would, and splits it), with 1/N of the batch, so every labelled pixel is seen once per epoch and the
global batch is the configured one. Gradients are averaged, so every process holds the same weights after each step.
On GPUs BatchNorm is synchronised across processes; on CPUs (gloo) each process normalises its own share.
Only process 0 writes files.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pixelpick.errors import DistributedTrainingError
from pixelpick.io import atomic_write

if TYPE_CHECKING:
    import torch

    from pixelpick.step_input import StepInput


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) outside a process group. A process that has not
    imported torch.distributed is in none, so the question costs no import of torch (a stage that only writes
    files starts in a second)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_size()[0] == 0


def init_from_environment() -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...); returns this process's device:
    its GPU (NCCL) when there are GPUs, else the CPU (gloo)."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def launch(step: StepInput, processes: int) -> dict:
    """Run the train step `step` as `processes` local processes (torchrun), each from this same input; returns
    what process 0 measured."""
    given, report = Path(step.scratch["distributed_input"]), Path(step.scratch["distributed_report"])
    report.unlink(missing_ok=True)
    atomic_write(given, lambda f: pickle.dump(step, f))
    threads = max(1, (os.cpu_count() or 1) // processes)  # processes side by side must not oversubscribe cores
    try:
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
             "-m", "pixelpick.ddp_worker", str(given), str(report)],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    finally:
        given.unlink(missing_ok=True)
    if done.returncode != 0 or not report.is_file():
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-5:]
        raise DistributedTrainingError(f"training round {step.round_id} on {processes} processes failed: "
                                       + " | ".join(line.strip() for line in last))
    measured = json.loads(report.read_text())
    report.unlink()
    return measured
