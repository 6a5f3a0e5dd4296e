"""Tasks of a human round: export the job, see how far it is, collect and version its labels, close it."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pixelpick import human
from tasks.steps import open_for_task
from tasks.versioning import track_batch


@task(cache_policy=NO_CACHE, task_run_name="export-job-r{round_id:02d}")
def export_job(campaign_dir: str, round_id: int) -> str:
    """The round's annotation job, from its queries."""
    return str(human.export_job(open_for_task(campaign_dir), round_id))


@task(cache_policy=NO_CACHE, task_run_name="job-progress-r{round_id:02d}")
def job_progress(campaign_dir: str, round_id: int) -> dict:
    """Pixels labelled and queried in the round's annotation job, and what training says instead of running
    (`answer`: still being labelled, or trained and unchanged; None when there is work)."""
    campaign = open_for_task(campaign_dir)
    progress = human.job_progress(campaign, round_id)
    return {"done": progress.done, "total": progress.total, "closed": progress.closed,
            "answer": human.train_answer(campaign, round_id, progress)}


@task(cache_policy=NO_CACHE, task_run_name="collect-labels-r{round_id:02d}")
def collect_labels(campaign_dir: str, round_id: int) -> str | None:
    """The finished job's labels, validated, as the round's batch file, then `dvc add`ed; returns its md5."""
    campaign = open_for_task(campaign_dir)
    progress = human.job_progress(campaign, round_id)
    if not (progress.closed and campaign.layout.batch(round_id).is_file()):  # a closed job was collected already
        human.collect_labels(campaign, round_id)
    # A collected batch may have been replaced since: DVC must never record a batch the ingest would refuse.
    human.check_batch(campaign, round_id)
    return track_batch(campaign, round_id)


@task(cache_policy=NO_CACHE, task_run_name="close-job-r{round_id:02d}")
def close_job(campaign_dir: str, round_id: int) -> None:
    """The round's labels are ingested: the job takes no further edits."""
    human.close_job(open_for_task(campaign_dir), round_id)
