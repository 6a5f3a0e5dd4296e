"""Mouse-free human annotation of queried pixels: job files, the progress store and the web annotator.

The pipeline exports a round's queries as a job (`export_job`), annotators label it in the browser
(`python -m pixelpick.annotation serve`), and `ingest_job_labels` turns the progress into a label batch.
The web server lives in `pixelpick.annotation.server` and is imported only when serving.
"""

from pixelpick.annotation.jobs import JOB_FORMAT, JOB_VERSION, Job, export_job, load_job, split_job, write_job
from pixelpick.annotation.progress import (
    ClosedInfo,
    ProgressStore,
    Submission,
    default_progress_path,
    ingest_job_labels,
)

__all__ = [
    "ClosedInfo",
    "JOB_FORMAT",
    "JOB_VERSION",
    "Job",
    "ProgressStore",
    "Submission",
    "default_progress_path",
    "export_job",
    "ingest_job_labels",
    "load_job",
    "split_job",
    "write_job",
]
