"""A whole campaign in plain Python on the synthetic default, shrunk to seconds."""

import numpy as np
import pandas as pd
import pytest

from pixelpick.campaign import Campaign
from pixelpick.labels import read_labels
from pixelpick.metrics import ConfusionMatrix


def majority_class_miou(dataset) -> float:
    """mIoU of always predicting the most frequent class: the chance level a model must beat."""
    masks = [dataset.load_mask(i) for i in dataset.image_ids]
    counts = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=dataset.label_space.num_classes + 1)
    majority = int(np.argmax(counts[: dataset.label_space.num_classes]))
    matrix = ConfusionMatrix(dataset.label_space.num_classes)
    for mask in masks:
        matrix.update(np.full_like(mask, majority), mask)
    return matrix.compute()["miou"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from tests.conftest import TINY_PARAMS
    from pixelpick.settings import load_settings

    folder = tmp_path_factory.mktemp("campaign")
    (folder / "params.yaml").write_text(TINY_PARAMS)
    campaign = Campaign(load_settings(folder / "params.yaml"))
    return campaign, campaign.run()


def test_two_rounds_spend_the_budget_and_learn_above_chance(finished):
    campaign, results = finished
    pool = len(campaign.pool)
    assert [r["labelled_pixels"] for r in results] == [10 * pool, 20 * pool]
    chance = majority_class_miou(campaign.eval_set)
    assert results[-1]["miou"] > chance + 0.02, (results[-1]["miou"], chance)


def test_a_round_never_queries_a_labelled_pixel(finished):
    campaign, _ = finished
    before = read_labels(campaign.paths(0).snapshot)
    queries = pd.read_parquet(campaign.paths(1).queries)
    overlap = queries.merge(before, on=["image_id", "y", "x"])
    assert overlap.empty
    assert queries.groupby("image_id").size().eq(10).all()


def test_snapshot_r_is_snapshot_r_minus_1_plus_round_r(finished):
    campaign, _ = finished
    r0 = read_labels(campaign.paths(0).snapshot)
    r1 = read_labels(campaign.paths(1).snapshot)
    pd.testing.assert_frame_equal(r1.iloc[: len(r0)], r0)
    assert set(r1["round"].iloc[len(r0):]) == {1}


def test_rerunning_a_round_reproduces_it_bit_for_bit(finished):
    campaign, results = finished
    paths = campaign.paths(1)
    before = {p: p.read_bytes() for p in (paths.queries, paths.annotations, paths.snapshot)}
    model_before = campaign.read_checkpoint(paths.model)["model"]
    metrics = campaign.run_round(1)
    assert {p: p.read_bytes() for p in before} == before
    model_after = campaign.read_checkpoint(paths.model)["model"]
    assert all(np.array_equal(model_before[k], model_after[k]) for k in model_before)
    assert metrics["miou"] == results[1]["miou"]


def test_a_crash_inside_ingest_keeps_the_table_and_a_rerun_completes_it(finished, monkeypatch):
    import pixelpick.labels as labels_module

    campaign, _ = finished
    paths = campaign.paths(1)
    expected = paths.snapshot.read_bytes()
    paths.snapshot.unlink()

    def crash(*args, **kwargs):
        raise OSError("power cut")

    with monkeypatch.context() as patch:
        patch.setattr(labels_module, "_write_atomic", crash)
        with pytest.raises(OSError, match="power cut"):
            campaign.ingest(1, paths.annotations)
    # The round's table was seeded from round 0's snapshot and the failed batch left nothing behind.
    pd.testing.assert_frame_equal(read_labels(paths.snapshot), read_labels(campaign.paths(0).snapshot))
    result = campaign.ingest(1, paths.annotations)
    assert result.duplicates == 0 and paths.snapshot.read_bytes() == expected
    assert campaign.ingest(1, paths.annotations).added == 0  # idempotent


def test_query_statistics_are_this_rounds_own(finished):
    campaign, _ = finished
    stats = campaign.query_statistics(1)
    assert sum(stats["label_histogram"].values()) == stats["queried_pixels"] == 10 * len(campaign.pool)
    assert stats["spatial_coverage"] > 0 and 0 <= stats["mean_score"] <= 1


def test_class_balanced_selection_weights_each_score_by_its_expected_class_weight(tmp_path):
    from pixelpick.acquisition import class_weights
    from pixelpick.probstore import ProbabilityStore
    from pixelpick.settings import load_settings
    from tests.conftest import TINY_PARAMS

    (tmp_path / "params.yaml").write_text(TINY_PARAMS)
    campaign = Campaign(load_settings(tmp_path / "params.yaml", {"acquire.class_balance": 1.0, "train.epochs": 1}))
    campaign.run_round(0)
    campaign.infer(1)
    queries = pd.read_parquet(campaign.select(1))
    labels = read_labels(campaign.paths(0).snapshot)
    space = campaign.pool.label_space
    known = labels["class_id"][labels["class_id"] != space.ignore_index]
    weights = class_weights(np.bincount(known, minlength=space.num_classes), power=1.0)
    store = ProbabilityStore(campaign.paths(1).probs)
    for image_id, picks in queries.groupby("image_id"):
        y, x = picks["y"].to_numpy(), picks["x"].to_numpy()
        expected = store.scores(image_id)[y, x] * (weights[:, None] * store.probs(image_id)[:, y, x]).sum(axis=0)
        assert picks["score"].to_numpy() == pytest.approx(expected, rel=1e-5)
    assert len(queries) == 10 * len(campaign.pool)
