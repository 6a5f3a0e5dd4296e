"""One process of a round's data-parallel training, as `pixelpick.distributed.launch` starts it on this machine:

    python -m torch.distributed.run --standalone --nproc_per_node N -m pixelpick.ddp_worker STEP_INPUT REPORT

It runs the train step on the step input the launching process pickled to STEP_INPUT (`pixelpick.step_input`), on
this process's own device; process 0 writes what it measured to REPORT. Apart from `pixelpick.distributed` so that
the low-level module (imported by training) depends on no step.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys
from pathlib import Path

from pixelpick.distributed import init_from_environment, is_main_process

USAGE = "usage: python -m torch.distributed.run ... -m pixelpick.ddp_worker STEP_INPUT REPORT"


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 2:
        raise SystemExit(USAGE)
    given, report = Path(arguments[0]), Path(arguments[1])
    import torch.distributed as dist

    from pixelpick.steps import train

    with given.open("rb") as f:
        step = pickle.load(f)  # written by this machine's own launching process, beside the campaign's files
    device = init_from_environment()
    try:
        # This process's GPU, or the CPU, with the thread count the launcher gave it (OMP_NUM_THREADS).
        measured = train(dataclasses.replace(step, runtime=dataclasses.replace(step.runtime, device=str(device))))
        if is_main_process():
            report.write_text(json.dumps(measured))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
