"""A campaign in plain Python through the recipe, on the synthetic default shrunk to seconds: what a round makes,
when a step counts as done, what its key depends on, and what opening a campaign checks."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from pixelpick.campaign import Campaign, open_campaign, open_recorded
from pixelpick.errors import CampaignError
from pixelpick.labels import read_labels
from pixelpick.metrics import ConfusionMatrix
from pixelpick.recipe import QUERY, STEPS, TRAIN_STEP, is_fresh, round_steps, run_campaign, run_round, step_key
from pixelpick.steps import select
from tests.conftest import TINY_PARAMS


def majority_class_miou(dataset) -> float:
    """mIoU of always predicting the most frequent class: the chance level a model must beat."""
    masks = [dataset.load_mask(i) for i in dataset.image_ids]
    counts = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=dataset.label_space.num_classes + 1)
    majority = int(np.argmax(counts[: dataset.label_space.num_classes]))
    matrix = ConfusionMatrix(dataset.label_space.num_classes)
    for mask in masks:
        matrix.update(np.full_like(mask, majority), mask)
    return matrix.compute()["miou"]


def new_campaign(folder, overrides=None, params: str = TINY_PARAMS) -> Campaign:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(params)
    return open_campaign(folder / "params.yaml", overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("campaign")
    # LR-ASPP, the tiny campaign's model, needs more than 2 epochs to beat chance on 48x64 scenes; DeepLabv3+ does.
    campaign = new_campaign(folder, params=TINY_PARAMS.replace("lraspp_mobilenetv3", "deeplabv3plus_mobilenetv2"))
    return campaign, run_campaign(campaign)


def outputs_of(campaign, round_id):
    files = campaign.files(round_id)
    return {p: p.read_bytes() for p in (files.queries, files.annotations, files.snapshot, files.model, files.metrics)}


def test_two_rounds_spend_the_budget_and_learn_above_chance(finished):
    campaign, results = finished
    pool = len(campaign.pool)
    assert [r["labelled_pixels"] for r in results] == [10 * pool, 20 * pool]
    assert results[-1]["evaluated_images"] == len(campaign.eval_set)
    assert results[-1]["miou"] > majority_class_miou(campaign.eval_set) + 0.02


def test_a_round_never_queries_a_labelled_pixel(finished):
    campaign, _ = finished
    before = read_labels(campaign.files(0).snapshot)
    queries = pd.read_parquet(campaign.files(1).queries)
    assert queries.merge(before, on=["image_id", "y", "x"]).empty
    assert queries.groupby("image_id").size().eq(10).all()


def test_snapshot_r_is_snapshot_r_minus_1_plus_round_r(finished):
    campaign, _ = finished
    r0, r1 = read_labels(campaign.files(0).snapshot), read_labels(campaign.files(1).snapshot)
    pd.testing.assert_frame_equal(r1.iloc[: len(r0)], r0)
    assert set(r1["round"].iloc[len(r0):]) == {1}


def test_a_finished_round_is_fresh_and_a_forced_rerun_gives_the_same_bytes(finished):
    campaign, _ = finished
    before = outputs_of(campaign, 1)
    assert all(r.fresh for r in run_round(campaign, 1))
    from pixelpick.recipe import run_step

    for step in round_steps(campaign):
        run_step(campaign, step, 1, force=True)
    assert outputs_of(campaign, 1) == before


@pytest.mark.parametrize("lost", ["queries", "annotations", "snapshot", "model"])
def test_deleting_an_output_remakes_exactly_it_and_what_depends_on_it(finished, lost):
    campaign, _ = finished
    before = outputs_of(campaign, 1)
    getattr(campaign.files(1), lost).unlink()
    results = {r.step: r for r in run_round(campaign, 1)}
    made_by = {"queries": "query", "annotations": "annotate", "snapshot": "ingest", "model": "train"}[lost]
    assert not results[made_by].fresh
    # The remade file is identical, so nothing downstream sees a change and every other step stays fresh.
    assert all(r.fresh for name, r in results.items() if name != made_by)
    assert outputs_of(campaign, 1) == before


def test_a_damaged_output_is_not_trusted(finished):
    campaign, _ = finished
    snapshot = campaign.files(1).snapshot
    good = snapshot.read_bytes()
    snapshot.write_bytes(good[: len(good) // 2])  # truncated: still there, but not what the record says
    assert not is_fresh(campaign, STEPS["ingest"], 1)
    assert not next(r for r in run_round(campaign, 1) if r.step == "ingest").fresh
    assert snapshot.read_bytes() == good


def test_extending_a_campaign_and_changing_runtime_settings_redo_nothing(finished, tmp_path):
    campaign, _ = finished
    keys = {(s.name, r): step_key(campaign, s, r) for r in (0, 1) for s in round_steps(campaign)}
    extended = open_campaign(campaign.layout.dir.parents[2] / "params.yaml",
                             {"campaign.rounds": 4, "train.device": "cpu", "train.eval_batch_size": 3})
    assert extended.settings.campaign.rounds == 4
    assert {(s.name, r): step_key(extended, s, r) for r in (0, 1) for s in round_steps(extended)} == keys
    assert all(is_fresh(extended, s, r) for r in (0, 1) for s in round_steps(extended))


def test_keys_hold_no_paths_a_moved_campaign_is_still_fresh(finished, tmp_path):
    campaign, _ = finished
    project = campaign.layout.dir.parents[2]
    moved = tmp_path / "moved"
    shutil.copytree(project / "data", moved / "data", ignore=shutil.ignore_patterns("probs.zarr"))
    copy = open_recorded(moved / "data" / "runs" / campaign.name)
    assert copy.settings.data.root == moved / "data" / "synthetic"
    for step in round_steps(copy):
        assert step_key(copy, step, 1) == step_key(campaign, step, 1)
        assert is_fresh(copy, step, 1)


def test_a_key_changes_with_the_settings_its_step_reads_and_no_others(finished):
    campaign, _ = finished
    query, train = STEPS["query"], STEPS["train"]

    def variant(section, **update):
        settings = campaign.settings.model_copy(update={section: getattr(campaign.settings, section).model_copy(
            update=update)})
        return Campaign(settings)

    more_epochs = variant("train", epochs=7)
    assert step_key(more_epochs, query, 1) == step_key(campaign, query, 1)
    assert step_key(more_epochs, train, 1) != step_key(campaign, train, 1)
    entropy = variant("acquire", strategy="entropy")
    assert step_key(entropy, query, 1) != step_key(campaign, query, 1)
    assert step_key(entropy, train, 1) == step_key(campaign, train, 1)


def test_selection_of_any_subset_of_images_picks_what_the_whole_pool_picks(finished):
    campaign, _ = finished
    from pixelpick.probstore import ProbabilityStore

    store = ProbabilityStore(campaign.files(1).probs)
    labels = read_labels(campaign.files(0).snapshot)
    labelled = {i: rows[["y", "x"]].to_numpy() for i, rows in labels.groupby("image_id")}
    ids = campaign.pool.image_ids
    step = QUERY.prepare(campaign, 1)
    whole = select(step, ids, labelled, store)
    halves = pd.concat([select(step, ids[1::2], labelled, store), select(step, ids[::2], labelled, store)])
    key = ["image_id", "y", "x"]
    pd.testing.assert_frame_equal(halves.sort_values(key).reset_index(drop=True),
                                  whole.sort_values(key).reset_index(drop=True))
    pd.testing.assert_frame_equal(whole, pd.read_parquet(campaign.files(1).queries))


def test_a_checkpoint_says_what_made_it(finished):
    campaign, _ = finished
    from pixelpick.checkpoints import read_checkpoint
    from pixelpick.digests import file_md5

    checkpoint = read_checkpoint(campaign.files(1).model)
    assert checkpoint["snapshot_md5"] == file_md5(campaign.files(1).snapshot)
    assert checkpoint["settings"]["acquire"]["strategy"] == "margin"
    assert checkpoint["settings"]["data"]["root"] == "../../synthetic"  # relative: the same bytes in any checkout
    assert checkpoint["label_space"]["classes"][0]["name"] == campaign.pool.label_space.classes[0].name


def test_query_statistics_are_this_rounds_own(finished):
    from pixelpick.reporting import query_statistics

    campaign, _ = finished
    stats = query_statistics(campaign, 1)
    assert sum(stats["label_histogram"].values()) == stats["queried_pixels"] == 10 * len(campaign.pool)
    assert stats["spatial_coverage"] > 0 and 0 <= stats["mean_score"] <= 1


def test_progress_table_and_plot_are_the_same_bytes_for_the_same_rounds(finished):
    from pixelpick.reporting import write_progress

    campaign, results = finished
    table, plot = write_progress(campaign)
    first = table.read_bytes(), plot.read_bytes()
    write_progress(campaign)
    assert (table.read_bytes(), plot.read_bytes()) == first
    assert pd.read_csv(table)["miou"].tolist() == pytest.approx([r["miou"] for r in results])


def test_labelled_pixels_per_image_is_the_running_total_and_old_metrics_files_still_read(finished, tmp_path):
    from pixelpick.reporting import read_metrics

    campaign, results = finished
    # Each round's budget is acquire.pixels_per_image (10); the metrics count what is labelled so far.
    assert [r["labelled_per_image"] for r in results] == [10.0, 20.0]
    assert all("pixels_per_image" not in r for r in results)
    old = json.loads(campaign.files(1).metrics.read_text())
    old["pixels_per_image"] = old.pop("labelled_per_image")
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    assert read_metrics(tmp_path / "metrics.json")["labelled_per_image"] == 20.0


# --------------------------------------------------------------------------------------------- opening a campaign


def test_a_campaign_is_refused_with_settings_that_differ_from_its_record(finished):
    campaign, _ = finished
    params = campaign.layout.dir.parents[2] / "params.yaml"
    with pytest.raises(CampaignError, match=r"acquire\.strategy: 'margin' recorded, 'entropy' given"):
        open_campaign(params, {"acquire.strategy": "entropy"})
    assert open_campaign(params, {"acquire.strategy": "entropy", "campaign.name": "other"}).name == "other"


@pytest.mark.parametrize("overrides, key", [
    ({"acquire.pixels_per_image": 4000}, "acquire.pixels_per_image"),
    ({"data.eval_split": "test"}, "data.eval_split"),
    ({"data.train_split": "nope"}, "data.train_split"),
])
def test_settings_the_data_cannot_hold_are_refused_before_anything_is_written(tmp_path, overrides, key):
    (tmp_path / "params.yaml").write_text(TINY_PARAMS)
    with pytest.raises(CampaignError, match=key.replace(".", r"\.")):
        open_campaign(tmp_path / "params.yaml", overrides)
    assert not (tmp_path / "data" / "runs" / "tiny").exists()


def test_class_balanced_selection_weights_each_score_by_its_expected_class_weight(tmp_path):
    from pixelpick.acquisition import class_weights
    from pixelpick.probstore import ProbabilityStore

    campaign = new_campaign(tmp_path, {"acquire.class_balance": 1.0, "train.epochs": 1})
    run_round(campaign, 0)
    run_round(campaign, 1)
    queries = pd.read_parquet(campaign.files(1).queries)
    labels = read_labels(campaign.files(0).snapshot)
    space = campaign.pool.label_space
    known = labels["class_id"][labels["class_id"] != space.ignore_index]
    weights = class_weights(np.bincount(known, minlength=space.num_classes), power=1.0)
    store = ProbabilityStore(campaign.files(1).probs)
    for image_id, picks in queries.groupby("image_id"):
        y, x = picks["y"].to_numpy(), picks["x"].to_numpy()
        expected = store.scores(image_id)[y, x] * (weights[:, None] * store.probs(image_id)[:, y, x]).sum(axis=0)
        assert picks["score"].to_numpy() == pytest.approx(expected, rel=1e-5)
    assert len(queries) == 10 * len(campaign.pool)
    record = json.loads(campaign.files(1).step_record("query").read_text())
    assert record["seconds"]["inference"] > 0 and record["seconds"]["selection"] > 0


def test_training_killed_mid_way_resumes_from_its_last_state_and_ends_with_the_same_model(tmp_path, monkeypatch):
    import pixelpick.training as training
    from pixelpick import steps

    reference = new_campaign(tmp_path / "a", {"train.epochs": 4, "train.checkpoint_every": 1})
    interrupted = new_campaign(tmp_path / "b", {"train.epochs": 4, "train.checkpoint_every": 1})
    from pixelpick.recipe import run_step

    for campaign in (reference, interrupted):
        for step in round_steps(campaign)[:3]:
            run_step(campaign, step, 0)
    steps.train(TRAIN_STEP.prepare(reference, 0))

    real_epoch, calls = training.train_one_epoch, []

    def killed_in_the_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    files = interrupted.files(0)
    with monkeypatch.context() as patch:
        patch.setattr(training, "train_one_epoch", killed_in_the_third_epoch)
        with pytest.raises(KeyboardInterrupt):
            steps.train(TRAIN_STEP.prepare(interrupted, 0))
    assert files.training_state.is_file() and not files.model.exists()
    measured = steps.train(TRAIN_STEP.prepare(interrupted, 0))
    assert measured["details"]["resumed_after_epoch"] == 2
    assert files.model.read_bytes() == reference.files(0).model.read_bytes()
    assert not files.training_state.exists()


def test_retention_keeps_the_newest_stores_and_a_removed_one_is_never_needed_again(tmp_path):
    campaign = new_campaign(tmp_path, {"campaign.rounds": 3, "campaign.keep_stores": 1, "train.epochs": 1})
    run_campaign(campaign)
    kept = [r for r in range(4) if campaign.files(r).probs.exists()]
    assert kept == [3]  # rounds 1 and 2's stores went once the next round had selected (round 0 has none)
    records = [json.loads(campaign.files(r).step_record("query").read_text())["details"] for r in (1, 2, 3)]
    assert all(record["store_bytes"] > 0 for record in records)
    assert [record["stores_removed"] for record in records] == [[], [1], [2]]
    assert all(is_fresh(campaign, STEPS["query"], r) for r in range(4))  # the queries themselves stay done


def test_the_generated_dataset_is_made_where_the_settings_say_and_announced(tmp_path, caplog):
    import logging

    from pixelpick.digests import tree_md5

    caplog.set_level(logging.WARNING, logger="pixelpick")
    root = tmp_path / "typo" / "synthetc"
    new_campaign(tmp_path, {"data.root": str(root)})
    assert f"generating the bundled synthetic dataset at {root}" in caplog.text
    generated = tree_md5(root)
    # A recorded campaign in a fresh clone (its records committed, its data not): the same data, at its own root.
    shutil.rmtree(tmp_path / "typo")
    caplog.clear()
    open_recorded(tmp_path / "data" / "runs" / "tiny")
    assert f"generating the bundled synthetic dataset at {root}" in caplog.text
    assert tree_md5(root) == generated
    # Another root for a recorded campaign is refused, never generated.
    with pytest.raises(CampaignError, match="data.root"):
        open_campaign(tmp_path / "params.yaml", {"data.root": str(tmp_path / "elsewhere")})
    assert not (tmp_path / "elsewhere").exists()


def test_a_campaign_named_on_the_command_line_is_reopened_from_its_record(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(TINY_PARAMS)
    open_campaign(params, {"campaign.name": "people", "campaign.annotator": "human", "train.epochs": 1})
    # `--campaign people` alone: params.yaml is only the template it was started from, not its settings.
    reopened = open_campaign(params, {"campaign.name": "people"})
    assert reopened.settings.campaign.annotator == "human" and reopened.settings.train.epochs == 1
    with pytest.raises(CampaignError, match="train.epochs: '1' recorded, '3' given"):
        open_campaign(params, {"campaign.name": "people", "train.epochs": 3})
    # The campaign that params.yaml itself names is checked against the whole file.
    open_campaign(params)
    params.write_text(TINY_PARAMS.replace("epochs: 2", "epochs: 4"))
    with pytest.raises(CampaignError, match="train.epochs: '2' recorded, '4' given"):
        open_campaign(params)


def test_the_rounds_picture_shows_the_uncertainty_map_wherever_the_store_lives(tmp_path, monkeypatch):
    """With `campaign.store_url` the store is not in the round's folder: the picture must find it where it is."""
    import pixelpick.reporting as reporting

    campaign = new_campaign(tmp_path, {"campaign.store_url": str(tmp_path / "shared-stores")})
    run_campaign(campaign)
    assert not campaign.files(1).probs.exists()
    shown = {}
    monkeypatch.setattr(reporting, "query_panel", lambda **panel: shown.update(panel) or b"")
    reporting.query_figure(campaign, 1)
    assert shown["scores"] and all(score is not None for score in shown["scores"])
