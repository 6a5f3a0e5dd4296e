"""One active-learning round as a Prefect flow: the recipe's steps as tasks, then versioning and reporting.

    pixelpick round 1                         # round 1 of the campaign in params.yaml (earlier rounds must exist)

The cluster's module (Dask, and torch for the query's shards) is imported only when a cluster is asked for: a run
without one, or a scheduled run that finds nothing to do, starts without them.
"""

from prefect import flow

from flows.parameters import CampaignChoice, ClusterChoice
from tasks.campaigns import finish_round, hold_campaign, start_campaign
from tasks.steps import run_step_task


@flow(name="pixelpick-round", flow_run_name="round-{round_id:02d}", log_prints=True)
def round_flow(campaign: CampaignChoice = CampaignChoice(), round_id: int = 0,
               cluster: ClusterChoice = ClusterChoice()) -> dict:
    """Run round `round_id` of a simulated campaign: query, annotate, ingest, train, evaluate (each skipped when
    its outputs are up to date), then record it in dvc.lock and publish its artifacts. With a cluster, the query's
    shards run on its workers (`on_cluster` gives this flow the cluster's task runner)."""
    opened = start_campaign(campaign.params_path(), campaign.overrides)
    with hold_campaign(opened["dir"]):
        for step in opened["steps"]:
            if step == "query" and cluster.enabled:
                from tasks.cluster import query_on_cluster

                query_on_cluster(opened["dir"], round_id, cluster.shard_count)
            else:
                run_step_task(opened["dir"], step, round_id)
        return finish_round(opened["dir"], round_id)


def on_cluster(cluster: ClusterChoice):
    """The round flow with the cluster's task runner (the flow's own process runs everything without one)."""
    if not cluster.enabled:
        return round_flow
    from tasks.cluster import dask_task_runner

    return round_flow.with_options(task_runner=dask_task_runner(cluster.workers, cluster.address))
