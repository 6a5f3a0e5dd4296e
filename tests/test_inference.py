"""Inference into the probability store: what it stores, and the timings a round logs."""

import json

import numpy as np
import torch

from pixelpick.acquisition import score_pixels
from pixelpick.campaign import Campaign
from pixelpick.inference import predict_probabilities
from pixelpick.io import atomic_write
from pixelpick.probstore import ProbabilityStore


def test_infer_stores_every_images_probabilities_and_scores_and_logs_its_timings(tiny_settings):
    campaign = Campaign(tiny_settings)
    torch.manual_seed(0)
    model = campaign.new_model()
    paths = campaign.paths(0)
    atomic_write(paths.model, lambda f: torch.save({"model": model.state_dict()}, f))

    store_path = campaign.infer(1)

    assert store_path == campaign.paths(1).probs
    store = ProbabilityStore(store_path)
    assert store.image_ids == campaign.pool.image_ids and store.strategy == "margin"
    model = campaign.load_model(paths.model)
    live = dict(predict_probabilities(model, campaign.pool, campaign.pool.image_ids, torch.device("cpu"),
                                       batch_size=campaign.settings.train.eval_batch_size))
    for image_id, probs in live.items():
        assert store.probs(image_id).dtype == np.float16
        np.testing.assert_allclose(store.probs(image_id), probs.numpy(), atol=1e-3)
        np.testing.assert_allclose(store.scores(image_id), score_pixels("margin", probs).numpy(), atol=1e-6)
    log = json.loads(campaign.paths(1).infer_log.read_text())
    assert set(log) == {"seconds", "scoring_seconds", "write_seconds", "images"}
    assert log["images"] == len(campaign.pool.image_ids)
    assert 0 < log["scoring_seconds"] < log["seconds"] and 0 < log["write_seconds"] < log["seconds"]
