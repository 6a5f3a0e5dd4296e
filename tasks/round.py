"""The steps of a round as Prefect tasks: thin calls into `pixelpick.campaign.Campaign`.

Each task takes the settings (JSON), the round and the digests of its inputs, and returns `{"path", "digest"}`
of what it wrote: paths and ids, never arrays. Results are persisted as JSON and cached on the inputs, so a
re-run round skips every step that already finished.
"""

from __future__ import annotations

from functools import partial

from prefect import task
from prefect.cache_policies import INPUTS

from tasks.common import combine, file_md5, open_campaign

Output = dict[str, str]

step = partial(
    task,
    cache_policy=INPUTS,
    persist_result=True,
    result_serializer="json",
    retries=1,
    retry_delay_seconds=2,
)


@step(task_run_name="infer-r{round_id:02d}")
def infer_probabilities(settings_json: str, round_id: int, model_digest: str) -> Output:
    """Previous round's model over the pool: probabilities and scores into this round's Zarr store."""
    campaign = open_campaign(settings_json)
    path = campaign.infer(round_id, progress=True)
    return {"path": str(path), "digest": combine("probs", model_digest, settings_json)}


@step(task_run_name="select-r{round_id:02d}")
def select_queries(settings_json: str, round_id: int, probs_digest: str, labels_digest: str) -> Output:
    """Score and select k pixels per image (at random in round 0), streaming from the store."""
    path = open_campaign(settings_json).select(round_id)
    return {"path": str(path), "digest": file_md5(path)}


@step(task_run_name="export-job-r{round_id:02d}")
def export_annotation_job(settings_json: str, round_id: int, queries_digest: str) -> Output:
    """The round's annotation job (JSON) for human annotators; the simulated annotator reads the queries."""
    path = open_campaign(settings_json).export_job(round_id)
    return {"path": str(path), "digest": file_md5(path)}


@step(task_run_name="annotate-r{round_id:02d}")
def annotate_simulated(settings_json: str, round_id: int, queries_digest: str) -> Output:
    """Label the queries from the ground truth: the simulated annotator, through the human ingest path."""
    path = open_campaign(settings_json).annotate_simulated(round_id)
    return {"path": str(path), "digest": file_md5(path)}


@step(task_run_name="ingest-r{round_id:02d}")
def ingest_labels(settings_json: str, round_id: int, batch_path: str, batch_digest: str, labels_digest: str) -> Output:
    """Validate the batch and append it to the round's label table (the round's snapshot)."""
    campaign = open_campaign(settings_json)
    campaign.ingest(round_id, batch_path)
    path = campaign.paths(round_id).snapshot
    return {"path": str(path), "digest": file_md5(path)}


@step(task_run_name="train-r{round_id:02d}", timeout_seconds=24 * 3600)
def train_model(settings_json: str, round_id: int, labels_digest: str) -> Output:
    """Train the round's model on its snapshot (GPU when there is one)."""
    path = open_campaign(settings_json).train(round_id, progress=True)
    return {"path": str(path), "digest": file_md5(path)}


@step(task_run_name="evaluate-r{round_id:02d}")
def evaluate_model(settings_json: str, round_id: int, model_digest: str) -> Output:
    """mIoU and per-class IoU of the round's model on the evaluation split, into metrics.json."""
    campaign = open_campaign(settings_json)
    campaign.evaluate(round_id, progress=True)
    path = campaign.paths(round_id).metrics
    return {"path": str(path), "digest": file_md5(path)}
