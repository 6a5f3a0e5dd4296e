"""A whole campaign as a Prefect flow: round 0 (random pixels), then N rounds, each a subflow.

    python -m flows.campaign                       # the campaign in params.yaml, by hand
    python -m flows.campaign --set campaign.rounds=5 --set acquire.strategy=entropy
    python -m flows.campaign --serve --cron "0 2 * * *"   # a scheduled deployment (needs `prefect server start`)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow

from flows.round import round_flow
from pixelpick.settings import Settings, load_settings, parse_override
from tasks.tracking import start_campaign_run
from tasks.versioning import version_progress


@flow(name="pixelpick-campaign", flow_run_name="campaign-{campaign_name}", log_prints=True)
def campaign_flow(settings_json: str, campaign_name: str = "campaign") -> list[dict]:
    """Initial random pixels, then `campaign.rounds` rounds; prints a table row per round."""
    settings = Settings.model_validate_json(settings_json)
    parent_run_id = start_campaign_run(settings_json)
    print(f"{'round':>5} {'labelled':>9} {'px/img':>7} {'mIoU':>6}  model version")
    results = []
    for round_id in range(settings.campaign.rounds + 1):
        result = round_flow(settings_json, round_id, parent_run_id)
        metrics = _read_metrics(result["metrics_path"])
        print(f"{round_id:>5} {metrics['labelled_pixels']:>9} {metrics['pixels_per_image']:>7.1f} "
              f"{100 * metrics['miou']:>6.1f}  v{result['model_version']}")
        results.append({**result, "miou": metrics["miou"], "labelled_pixels": metrics["labelled_pixels"]})
    version_progress(settings_json)
    return results


def run_campaign(settings: Settings) -> list[dict]:
    return campaign_flow(settings.model_dump_json(), settings.campaign.name)


def run_single_round(settings: Settings, round_id: int) -> dict:
    settings_json = settings.model_dump_json()
    return round_flow(settings_json, round_id, start_campaign_run(settings_json))


def _read_metrics(path: str) -> dict:
    return json.loads(Path(path).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--serve", action="store_true", help="serve as a deployment instead of running once")
    parser.add_argument("--cron", help="schedule for --serve, e.g. '0 2 * * *'")
    parser.add_argument("--interval", type=float, help="schedule for --serve, in seconds")
    args = parser.parse_args()
    settings = load_settings(args.params, dict(parse_override(o) for o in args.overrides))
    if args.serve:
        campaign_flow.serve(
            name=f"campaign-{settings.campaign.name}",
            parameters={"settings_json": settings.model_dump_json(), "campaign_name": settings.campaign.name},
            cron=args.cron,
            interval=args.interval,
            pause_on_shutdown=False,
        )
    else:
        run_campaign(settings)


if __name__ == "__main__":
    main()
