"""A whole campaign as a Prefect flow: round 0 (random pixels), then `campaign.rounds` rounds, each a subflow.

    pixelpick campaign                                   # the campaign in params.yaml
    pixelpick campaign --set acquire.strategy=entropy --set campaign.name=synthetic-entropy
    pixelpick campaign --serve --cron "0 2 * * *"        # a scheduled deployment (needs `prefect server start`)
"""

from prefect import flow

from flows.parameters import CampaignChoice, ClusterChoice
from flows.round import on_cluster
from tasks.campaigns import finished_summaries, finished_summary, hold_campaign, start_campaign


@flow(name="pixelpick-campaign", flow_run_name="campaign", log_prints=True)
def campaign_flow(campaign: CampaignChoice = CampaignChoice(), cluster: ClusterChoice = ClusterChoice()) -> list[dict]:
    """Every round of a simulated campaign, each skipped step by step when already done; prints a row per round.
    With a cluster, each round's query runs in shards on it."""
    opened = start_campaign(campaign.params_path(), campaign.overrides)
    finished = finished_summaries(opened["dir"])
    if finished is not None:  # a scheduled run with nothing to do: no lock, no MLflow run, nothing written
        return finished
    print(f"campaign {opened['name']}: {opened['dir']}")
    print(f"{'round':>5} {'labelled':>9} {'px/img':>7} {'mIoU':>6}  model version")
    results = []
    with hold_campaign(opened["dir"]):
        for round_id in range(opened["rounds"] + 1):
            # A finished, unchanged round is not run again (no subflow, no versioning, no MLflow call).
            summary = finished_summary(opened["dir"], round_id) or on_cluster(cluster)(campaign, round_id, cluster)
            miou = "n/a" if summary["miou"] is None else f"{100 * summary['miou']:.1f}"
            print(f"{round_id:>5} {summary['labelled_pixels']:>9} {summary['labelled_per_image']:>7.1f} {miou:>6}  "
                  f"v{summary['model_version']}")
            results.append(summary)
    return results
