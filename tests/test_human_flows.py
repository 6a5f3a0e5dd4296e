"""A human-in-the-loop round: the query flow exports a job, the train flow waits for it, then trains on it."""

from __future__ import annotations

import pytest

from flows.human import query_flow, train_flow
from pixelpick.annotation.jobs import load_job
from pixelpick.annotation.progress import ProgressStore, Submission, default_progress_path
from pixelpick.campaign import Campaign
from pixelpick.labels import read_labels
from tests.test_flows import make_settings, prefect_server  # noqa: F401  (the shared server fixture)

pytestmark = pytest.mark.slow


def label_from_ground_truth(campaign: Campaign, job_path, annotator: str, limit: int | None = None) -> None:
    job = load_job(job_path)
    store = ProgressStore(default_progress_path(job_path), job)
    pixels = store.claim(annotator, limit or job.num_pixels)[:limit]
    for n, pixel in enumerate(pixels):
        truth = int(campaign.pool.load_mask(pixel.image_id)[pixel.y, pixel.x])
        store.record(Submission(annotator, pixel.image_id, pixel.y, pixel.x, truth, 0.5, f"{annotator}-{n}"))


def test_query_then_train_once_the_job_is_complete(prefect_server, tmp_path):  # noqa: F811
    settings = make_settings(tmp_path, "human")
    settings_json = settings.model_dump_json()
    campaign = Campaign(settings)

    job_path = query_flow(settings_json, 0)
    assert load_job(job_path).num_pixels == 10 * len(campaign.pool)

    label_from_ground_truth(campaign, job_path, "ana", limit=5)
    waiting = train_flow(settings_json, 0)
    assert waiting == {"status": "waiting", "done": 5, "total": 10 * len(campaign.pool)}
    assert not campaign.paths(0).model.exists()

    label_from_ground_truth(campaign, job_path, "ben")
    trained = train_flow(settings_json, 0)
    assert trained["status"] == "trained"
    labels = read_labels(campaign.paths(0).snapshot)
    assert len(labels) == 10 * len(campaign.pool)
    assert set(labels["source"]) == {"human"} and set(labels["annotator"]) == {"ana", "ben"}
    assert campaign.human_batch(0).exists()

    # The next round's pixels come from this model and never repeat a labelled pixel.
    next_job = load_job(query_flow(settings_json, 1))
    asked = {(i.image_id, y, x) for i in next_job.images for y, x in i.pixels}
    assert not asked & set(zip(labels["image_id"], labels["y"], labels["x"]))
