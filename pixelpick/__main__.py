"""The library's command line, in plain Python (no Prefect, DVC or MLflow).

    python -m pixelpick campaign            # a whole campaign, printing mIoU per round
    python -m pixelpick round 2             # one round (what each `dvc repro` stage runs)
    python -m pixelpick progress            # the campaign's mIoU against labelled pixels, as CSV
"""

from __future__ import annotations

import argparse
import logging
import time

from pixelpick.campaign import Campaign
from pixelpick.settings import load_settings, parse_override


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pixelpick", description=__doc__)
    parser.add_argument("command", choices=["campaign", "round", "progress"])
    parser.add_argument("round", nargs="?", type=int, help="the round, for the round command")
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set train.epochs=2 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = load_settings(args.params, dict(parse_override(o) for o in args.overrides))
    campaign = Campaign(settings)
    if args.command == "round":
        if args.round is None:
            parser.error("the round command needs a round number")
        campaign.run_round(args.round, progress=True)
        return
    if args.command == "progress":
        print(campaign.write_progress())
        return
    print(f"{'round':>5} {'px/img':>7} {'labelled':>9} {'mIoU':>6} {'seconds':>8}")
    for round_id in range(settings.campaign.rounds + 1):
        started = time.perf_counter()
        metrics = campaign.run_round(round_id, progress=True)
        print(f"{round_id:>5} {metrics['pixels_per_image']:>7.1f} {metrics['labelled_pixels']:>9d} "
              f"{100 * metrics['miou']:>6.1f} {time.perf_counter() - started:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
