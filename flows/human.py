"""Human-in-the-loop rounds: a query flow that ends with an annotation job, and a train flow that starts once
the job is complete. Labelling takes hours, so no flow run sits paused waiting for it.

    pixelpick human query 1 --campaign my-photos      # pick the round's pixels, export the job, say how to open it
    pixelpick annotate serve --job data/runs/my-photos/rounds/r01/job.json
    pixelpick human train 1 --campaign my-photos      # collect, version, ingest, train, evaluate ("waiting" until done)
    pixelpick human train 1 --campaign my-photos --serve --interval 600   # the same, every 10 minutes
"""

from prefect import flow

from flows.parameters import CampaignChoice
from tasks.campaigns import finish_round, hold_campaign, start_campaign
from tasks.human import close_job, collect_labels, export_job, job_progress
from tasks.steps import run_step_task
from tasks.versioning import version_query


@flow(name="pixelpick-human-query", flow_run_name="query-r{round_id:02d}", log_prints=True)
def query_flow(campaign: CampaignChoice = CampaignChoice(), round_id: int = 0) -> str:
    """Pick the round's pixels (at random in round 0, else with the previous round's model) and export the job."""
    opened = start_campaign(campaign.params_path(), campaign.overrides, annotator="human")
    with hold_campaign(opened["dir"]):
        run_step_task(opened["dir"], "query", round_id)
        job = export_job(opened["dir"], round_id)
        version_query(opened["dir"], round_id)
    print(f"annotation job ready: {job}\n  label it with: pixelpick annotate serve --job {job}")
    return job


@flow(name="pixelpick-human-train", flow_run_name="train-r{round_id:02d}", log_prints=True)
def train_flow(campaign: CampaignChoice = CampaignChoice(), round_id: int = 0) -> dict:
    """Once the round's job is complete: collect and version its labels, ingest, retrain, evaluate, register."""
    opened = start_campaign(campaign.params_path(), campaign.overrides, annotator="human")
    progress = job_progress(opened["dir"], round_id)
    if progress["answer"] is not None:  # still being labelled, or trained already: no lock, nothing written
        print(progress["answer"])
        return {"status": "waiting" if progress["done"] < progress["total"] else "trained", **progress}
    with hold_campaign(opened["dir"]):
        collect_labels(opened["dir"], round_id)
        for step in opened["steps"]:
            if step != "query":  # the query step ran in the query flow
                run_step_task(opened["dir"], step, round_id)
        close_job(opened["dir"], round_id)
        summary = finish_round(opened["dir"], round_id)
    shown = summary["not_measured"] or f"mIoU {100 * summary['miou']:.1f}"
    print(f"round {round_id}: {summary['labelled_pixels']} labelled pixels, {shown}, model version "
          f"{summary['model_version']}")
    return {"status": "trained", **summary}
