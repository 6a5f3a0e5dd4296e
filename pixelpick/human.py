"""Human labelling of a round: the job people label, and the batch their labels become.

    export_job      the round's queries as an annotation job (rounds/rNN/job.json; docs/annotation.md)
    job_progress    how many of the job's pixels are labelled
    collect_labels  the finished job's labels, validated against the job and against the label snapshot they
                    will join, written as the round's batch file (labels/rNN.parquet); nothing is written when
                    any label is invalid. Beside the round's metrics goes labelling.json: seconds per label and
                    how many of the model's suggestions were accepted (logged as MLflow metrics)
    close_job       after the batch is ingested: the job takes no further edits, and the annotator says so

The batch file is what the pipeline versions and ingests, so a human round is reproduced from it and never from
the progress database or the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from pixelpick.annotation.jobs import export_job as write_job_file
from pixelpick.annotation.jobs import load_job
from pixelpick.annotation.progress import ProgressStore, default_progress_path, ingest_job_labels
from pixelpick.campaign import Campaign
from pixelpick.io import write_json
from pixelpick.layout import round_name
from pixelpick.recipe import INGEST, QUERY, finished_round


@dataclass(frozen=True)
class JobProgress:
    done: int
    total: int
    closed: bool


def export_job(campaign: Campaign, round_id: int) -> Path:
    """Write the round's annotation job from its queries (the same queries give the same pixels)."""
    files = campaign.files(round_id)
    pool = QUERY.prepare(campaign, round_id).pool  # the round's images and classes, as frozen when it started
    return write_job_file(pd.read_parquet(files.queries), pool,
                          job_id=f"{campaign.name}-{round_name(round_id)}", campaign=campaign.name,
                          round_id=round_id, path=files.job, dataset_name=campaign.settings.data.dataset)


def job_progress(campaign: Campaign, round_id: int) -> JobProgress:
    job_path = campaign.files(round_id).job
    job = load_job(job_path)
    database = default_progress_path(job_path)
    if not database.exists():
        return JobProgress(0, job.num_pixels, False)
    store = ProgressStore(database, job)
    return JobProgress(store.done_count(), job.num_pixels, store.closed_info() is not None)


def train_answer(campaign: Campaign, round_id: int, progress: JobProgress) -> str | None:
    """What training a human round says instead of running: its job is still being labelled, or the round is
    trained and nothing it was made from has changed. None when there is work to do."""
    if progress.done < progress.total:
        return f"waiting: {progress.done} of {progress.total} pixels labelled in round {round_id}'s job"
    finished = finished_round(campaign, round_id)
    if finished is not None:
        return (f"round {round_id} of campaign {campaign.name} is trained and unchanged (model version "
                f"{finished.get('model_version')}); nothing to do")
    return None


def collect_labels(campaign: Campaign, round_id: int) -> Path:
    """The finished job's labels as the round's batch file. They are checked against the job (every queried pixel
    once, with a class of the job) and against the previous snapshot (no pixel labelled twice) first."""
    job_path = campaign.files(round_id).job
    batch = campaign.layout.batch(round_id)
    staging = batch.with_name(f".{batch.name}.collecting")
    try:
        ingest_job_labels(job_path, default_progress_path(job_path), staging)
        check_batch(campaign, round_id, staging)
        staging.replace(batch)
        # The batch has no column for it (the label schema is shared with every source), so the round says it.
        stats = ProgressStore(default_progress_path(job_path), load_job(job_path)).suggestion_stats()
        write_json(stats, campaign.files(round_id).labelling)
    finally:
        staging.unlink(missing_ok=True)
    return batch


def check_batch(campaign: Campaign, round_id: int, batch: Path | None = None) -> None:
    """Validate a round's batch file (by default `labels/rNN.parquet`) in full, writing nothing: the round's ingest
    step run into a scratch file. Exact types, the round's own `round`, only pixels the round queried, classes of
    the dataset, and no clash with the previous snapshot. LabelFileError, LabelValidationError or StepInputError,
    in one line, names the problem and the first bad row.

    Run before the batch is versioned, so a batch replaced after its job was collected never reaches DVC."""
    ingest = INGEST.prepare(campaign, round_id)
    batch = ingest.inputs["batch"] if batch is None else batch
    scratch = batch.with_name(f".{batch.name}.check")
    try:
        INGEST.run(replace(ingest, inputs={**ingest.inputs, "batch": batch}, outputs={"snapshot": scratch}))
    finally:
        scratch.unlink(missing_ok=True)


def close_job(campaign: Campaign, round_id: int) -> None:
    """Close the round's job to further edits: its labels are now the round's snapshot."""
    job_path = campaign.files(round_id).job
    store = ProgressStore(default_progress_path(job_path), load_job(job_path))
    if store.closed_info() is None:
        store.close(f"ingested into round {round_id} of campaign {campaign.name}")
