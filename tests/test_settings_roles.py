"""Each setting's role is declared once (pixelpick/settings.py) and every list of keys is derived from it; a step
that reads a setting it does not declare fails."""

from __future__ import annotations

import pytest

from pixelpick.campaign import CHANGEABLE_KEYS, RUNTIME_KEYS, load_record, open_campaign, recipe_differences
from pixelpick.recipe import STEPS, round_steps
from pixelpick.settings import STEPS as STEP_NAMES
from pixelpick.settings import Settings, SettingsView, UndeclaredSetting, flatten, roles, step_reads


def test_every_field_has_exactly_one_role_and_names_only_real_steps():
    declared = roles()
    assert set(declared) == set(flatten(Settings().model_dump())), "every settings key has a role, and only those"
    for key, role in declared.items():
        assert role.role in {"recipe", "runtime", "location"}, key
        assert set(role.steps) <= set(STEP_NAMES), key
    assert set(STEPS) == set(STEP_NAMES)


@pytest.mark.parametrize("initial_epochs", [None, 15])
def test_every_key_a_step_declares_is_a_recipe_key_and_no_runtime_or_location_key_is(tiny_settings, initial_epochs):
    settings = tiny_settings.model_copy(update={"train": tiny_settings.train.model_copy(
        update={"initial_epochs": initial_epochs})})
    from pixelpick.campaign import Campaign

    campaign = Campaign(settings)
    for step in STEPS.values():
        for round_id in (0, 1, 2):
            keys = step.settings(campaign, round_id)
            assert len(keys) == len(set(keys)), (step.name, keys)
            assert {roles()[key].role for key in keys} == {"recipe"}, (step.name, round_id, keys)
            assert set(keys) <= set(step_reads(step.name, round_id)), "a key holds only what the step reads"
    assert not set(RUNTIME_KEYS) & {key for step in STEPS.values() for key in step.settings(campaign, 1)}
    # Round 0 trains one epochs key: the one it runs.
    trained = [key for key in STEPS["train"].settings(campaign, 0) if key.endswith("epochs")]
    assert trained == (["train.initial_epochs"] if initial_epochs else ["train.epochs", "train.initial_epochs"])
    assert [key for key in STEPS["train"].settings(campaign, 1) if key.endswith("epochs")] == ["train.epochs"]


def test_the_derived_lists_follow_the_declared_roles():
    assert set(RUNTIME_KEYS) == {"train.device", "train.num_workers", "train.eval_batch_size",
                                 "train.checkpoint_every", "campaign.keep_stores"}
    assert {"campaign.rounds", "campaign.store_url", "data.cache_dir", *RUNTIME_KEYS} == set(CHANGEABLE_KEYS)
    recorded = Settings()
    changed = Settings.model_validate({"train": {"device": "cpu", "epochs": 3}, "campaign": {"rounds": 9}})
    assert set(recipe_differences(recorded, changed)) == {"train.epochs"}


def test_a_reopened_campaign_takes_new_values_of_changeable_keys_and_refuses_others(tiny_settings, tmp_path):
    from pixelpick.errors import CampaignError

    params = tmp_path / "params.yaml"
    open_campaign(params)
    reopened = open_campaign(params, {"train.checkpoint_every": 2, "campaign.rounds": 4,
                                      "campaign.keep_stores": 1})
    assert (reopened.settings.train.checkpoint_every, reopened.settings.campaign.rounds,
            reopened.settings.campaign.keep_stores) == (2, 4, 1)
    assert load_record(reopened.layout).campaign.rounds == 4  # and recorded
    with pytest.raises(CampaignError, match=r"train\.lr_head"):
        open_campaign(params, {"train.lr_head": 0.5})


def test_a_settings_view_refuses_an_undeclared_key():
    view = SettingsView(Settings(), ("train.epochs", "data.dataset"))
    assert view.train.epochs == 15 and view.data.dataset == "synthetic"
    with pytest.raises(UndeclaredSetting, match=r"train\.lr_head"):
        view.train.lr_head  # noqa: B018
    with pytest.raises(AttributeError):
        view.train.epochs = 3
    # Nor can a whole section be had at once, and a value given for one computation must be one it declares.
    for section_at_once in ("model_dump", "model_copy", "model_dump_json"):
        with pytest.raises(UndeclaredSetting, match=section_at_once):
            getattr(view.train, section_at_once)
    assert view.train.replaced(epochs=4).epochs == 4 and view.train.epochs == 15
    with pytest.raises(UndeclaredSetting, match=r"train\.lr_head"):
        view.train.replaced(lr_head=0.5)


def test_each_step_runs_reading_only_what_it_declares_and_fails_reading_more(tiny_settings, tmp_path, monkeypatch):
    """Every step of rounds 0 and 1 runs on its `StepInput`, which exposes only its declared settings; a step made
    to read one more setting fails."""
    campaign = open_campaign(tmp_path / "params.yaml")
    for round_id in (0, 1):
        campaign.freeze_pool(round_id)  # what starting a round does (`recipe.begin_step`)
        for step in round_steps(campaign):
            step.run(step.prepare(campaign, round_id))
            assert all(path.is_file() for path in step.outputs(campaign, round_id).values())

    import pixelpick.labelling as labelling

    real = labelling.simulate_annotations

    def reads_more(*args, **kwargs):
        seen.settings.acquire.strategy  # noqa: B018  (annotate does not declare it)
        return real(*args, **kwargs)

    annotate = STEPS["annotate"]
    seen = annotate.prepare(campaign, 1)
    monkeypatch.setattr(labelling, "simulate_annotations", reads_more)
    with pytest.raises(UndeclaredSetting, match=r"acquire\.strategy"):
        annotate.run(seen)


def test_a_step_is_a_function_of_its_step_input_alone():
    import inspect

    from pixelpick import labelling, steps

    for function in (steps.query, steps.train, steps.evaluate, labelling.annotate, labelling.ingest):
        parameters = inspect.signature(function).parameters
        assert [p.annotation for p in parameters.values()] == ["StepInput"], function.__name__


def test_a_step_input_is_frozen_and_pickles_into_the_same_step(tiny_settings, tmp_path):
    """What a Dask worker or a DDP process receives: the same settings, files and key, its data derived again
    there (never pickled), and nothing that can be changed."""
    import dataclasses
    import pickle

    from pixelpick.recipe import run_step, step_key

    campaign = open_campaign(tmp_path / "params.yaml")
    run_step(campaign, STEPS["query"], 0)  # freezes round 0's pool and writes the queries annotate reads
    step = STEPS["annotate"].prepare(campaign, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.round_id = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        step.inputs["queries"] = tmp_path / "other.parquet"  # type: ignore[index]
    pickled = pickle.dumps(step)
    assert step.pool.image_ids  # derived, and cached on this copy only
    assert len(pickle.dumps(step)) == len(pickled)
    copy = pickle.loads(pickled)
    assert copy.key() == step.key() == step_key(campaign, STEPS["annotate"], 0)
    assert copy.pool.image_ids == step.pool.image_ids and dict(copy.outputs) == dict(step.outputs)
    with pytest.raises(UndeclaredSetting, match=r"acquire\.strategy"):
        copy.settings.acquire.strategy  # noqa: B018
