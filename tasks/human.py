"""Tasks of the human-in-the-loop round: how far the annotation job is, and collecting its finished labels."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pixelpick.annotation.jobs import load_job
from pixelpick.annotation.progress import ProgressStore, default_progress_path
from tasks.common import file_md5, open_campaign


@task(cache_policy=NO_CACHE, task_run_name="job-progress-r{round_id:02d}")
def job_progress(settings_json: str, round_id: int) -> dict[str, int]:
    """Pixels labelled and queried in the round's annotation job (0 labelled before anyone starts)."""
    job_path = open_campaign(settings_json).paths(round_id).job
    job = load_job(job_path)
    progress_db = default_progress_path(job_path)
    done = ProgressStore(progress_db, job).done_count() if progress_db.exists() else 0
    return {"done": done, "total": job.num_pixels}


@task(cache_policy=NO_CACHE, task_run_name="collect-labels-r{round_id:02d}")
def collect_human_labels(settings_json: str, round_id: int) -> dict[str, str]:
    """The finished job's labels as the round's batch file, validated against the job."""
    path = open_campaign(settings_json).collect_human_labels(round_id)
    return {"path": str(path), "digest": file_md5(path)}
