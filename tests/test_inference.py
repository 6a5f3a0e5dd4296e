"""Inference into the probability store: what it stores, what the query step records, and when a store is reused."""

from dataclasses import replace

import numpy as np
import torch

from pixelpick.acquisition import score_pixels
from pixelpick.campaign import Campaign
from pixelpick.checkpoints import save_checkpoint
from pixelpick.inference import predict_probabilities
from pixelpick.probstore import ProbabilityStore
from pixelpick.recipe import QUERY, TRAIN_STEP
from pixelpick.steps import query


def infer(campaign: Campaign, round_id: int, model_path):
    """The query step of `round_id` with `model_path`: its store, and the seconds it spent."""
    step = QUERY.prepare(campaign, round_id)
    measured = query(replace(step, inputs={"previous_model": model_path}))  # no labels yet: any pixel may be asked
    return ProbabilityStore(campaign.files(round_id).probs), measured["seconds"]


def _round_zero_model(campaign: Campaign):
    torch.manual_seed(0)
    model = TRAIN_STEP.prepare(campaign, 0).new_model()
    path = campaign.files(0).model
    save_checkpoint(path, model, arch=campaign.settings.model.arch, num_classes=campaign.pool.label_space.num_classes,
                    dropout_p=0.2)
    return path


def test_infer_stores_every_images_probabilities_and_scores(tiny_settings):
    campaign = Campaign(tiny_settings)
    model_path = _round_zero_model(campaign)

    store, seconds = infer(campaign, 1, model_path)

    assert store.path == campaign.files(1).probs and store.missing_images() == []
    assert store.image_ids == campaign.pool.image_ids and store.strategy == "margin"
    assert seconds["inference"] > seconds["scoring"] > 0
    model = QUERY.prepare(campaign, 1).load_model(model_path)
    live = dict(predict_probabilities(model, campaign.pool, campaign.pool.image_ids, torch.device("cpu"),
                                       batch_size=campaign.settings.train.eval_batch_size))
    for image_id, probs in live.items():
        assert store.probs(image_id).dtype == np.float16
        np.testing.assert_allclose(store.probs(image_id), probs.numpy(), atol=1e-3)
        np.testing.assert_allclose(store.scores(image_id), score_pixels("margin", probs).numpy(), atol=1e-5)


def test_a_store_is_reused_only_while_complete_and_made_by_the_same_model(tiny_settings):
    campaign = Campaign(tiny_settings)
    model_path = _round_zero_model(campaign)
    infer(campaign, 1, model_path)
    _, seconds = infer(campaign, 1, model_path)
    assert seconds["inference"] == 0  # reused

    # A chunk file goes missing: the store would read it back as NaN, so it is recomputed, never used.
    chunk = next((campaign.files(1).probs / "scores").rglob("c.*"))
    chunk.unlink()
    assert ProbabilityStore(campaign.files(1).probs).missing_images()
    store, seconds = infer(campaign, 1, model_path)
    assert seconds["inference"] > 0 and not store.missing_images()
    assert all(np.isfinite(scores).all() for _, scores in store.iter_scores())

    # Another model: recomputed.
    torch.manual_seed(1)
    save_checkpoint(model_path, TRAIN_STEP.prepare(campaign, 0).new_model(), arch=campaign.settings.model.arch,
                    num_classes=campaign.pool.label_space.num_classes, dropout_p=0.2)
    _, seconds = infer(campaign, 1, model_path)
    assert seconds["inference"] > 0


def test_a_damaged_chunk_is_recomputed_never_trusted(tiny_settings):
    import pytest

    from pixelpick.probstore import DamagedStoreError

    campaign = Campaign(tiny_settings)
    model_path = _round_zero_model(campaign)
    infer(campaign, 1, model_path)
    queries = campaign.files(1).queries.read_bytes()
    chunks = sorted((campaign.files(1).probs / "scores").rglob("c.*")) + sorted(
        (campaign.files(1).probs / "probs").rglob("c.*"))

    def zeroed(path):
        path.write_bytes(bytes(path.stat().st_size))  # same size, all zeros

    def truncated(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    for damage, chunk in ((zeroed, chunks[0]), (truncated, chunks[1]), (zeroed, chunks[-1]),
                          (truncated, chunks[-2]), (lambda p: p.unlink(), chunks[2])):
        damage(chunk)
        store = ProbabilityStore(campaign.files(1).probs)
        assert store.damaged_images(), (damage, chunk)
        if chunk.exists():  # read directly, a damaged chunk is one line naming it, never probabilities
            with pytest.raises(DamagedStoreError, match=chunk.name) as refused:
                dict(store.iter_scores()) if "scores" in str(chunk) else [store.probs(i) for i in store.image_ids]
            assert "\n" not in str(refused.value)
        # The query step recomputes the store, and picks exactly what it picked before.
        store, seconds = infer(campaign, 1, model_path)
        assert seconds["inference"] > 0 and store.damaged_images() == []
        assert campaign.files(1).queries.read_bytes() == queries
