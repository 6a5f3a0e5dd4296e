"""One process of a round's data-parallel training, as `pixelpick.distributed.launch` starts it on this machine:

    python -m torch.distributed.run --standalone --nproc_per_node N -m pixelpick.ddp_worker CAMPAIGN_DIR ROUND REPORT

It runs the recipe's train step with the step's own inputs and outputs; process 0 writes what it measured to
REPORT. Apart from `pixelpick.distributed` so that the low-level module (imported by training) depends on no step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pixelpick.campaign import open_recorded
from pixelpick.distributed import init_from_environment, is_main_process
from pixelpick.recipe import TRAIN_STEP

USAGE = "usage: python -m pixelpick.ddp_worker CAMPAIGN_DIR ROUND REPORT (under torchrun)"


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 3 or not arguments[1].isdigit():
        raise SystemExit(USAGE)
    campaign_dir, round_id, report = arguments[0], int(arguments[1]), Path(arguments[2])
    import torch.distributed as dist

    device = init_from_environment()
    try:
        campaign = open_recorded(campaign_dir, device)  # this process's GPU, or the CPU
        measured = TRAIN_STEP.run(campaign, round_id, TRAIN_STEP.inputs(campaign, round_id),
                                  TRAIN_STEP.outputs(campaign, round_id), False)
        if is_main_process():
            report.write_text(json.dumps(measured))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
