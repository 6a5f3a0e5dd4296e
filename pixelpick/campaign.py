"""A campaign: its recorded settings, its folder and its data.

A campaign starts from `params.yaml` plus command-line overrides. On first use its complete settings are recorded in
the campaign's own `params.yaml` (paths relative to the campaign folder); from then on that record is the
campaign's single source of configuration, whichever way a round runs (plain Python, Prefect, `dvc repro`).
Opening an existing campaign with settings that differ from its record is refused, naming the keys, except for
`campaign.rounds` (a campaign may be extended) and the keys that only say where or how fast to run.
"""

from __future__ import annotations

import json
import logging
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pixelpick.datasets import get_dataset
from pixelpick.datasets.base import SegmentationDataset, label_space_record
from pixelpick.datasets.synthetic import generate_synthetic
from pixelpick.errors import CampaignError, DatasetError
from pixelpick.io import atomic_write, write_json
from pixelpick.label_space import check_label_space
from pixelpick.labels import read_labels
from pixelpick.layout import CampaignLayout, RoundFiles
from pixelpick.pools import compare, date, describe_pool, read_manifest, write_manifest
from pixelpick.settings import (
    Settings,
    flatten,
    keys_with,
    load_settings,
    roles,
)

log = logging.getLogger(__name__)

# Derived from the roles pixelpick/settings.py declares. Runtime keys say how fast or on what to run, not what to
# compute: they never make a campaign "another recipe".
RUNTIME_KEYS = keys_with("runtime")
# What a recorded campaign takes a new value of: no step's output depends on it (runtime keys, the number of
# rounds, where stores go).
CHANGEABLE_KEYS = tuple(key for key, role in roles().items() if role.may_change)
_PATH_KEYS = tuple(key for key, role in roles().items() if role.is_path)
# A preset is shorthand for the train keys it fills: the record spells those out and holds no preset.
_PRESET_KEY = "train.preset"



def round_seed(seed: int, round_id: int) -> int:
    """One seed per (campaign, round), so any round can be re-run on its own with the same randomness."""
    return seed * 10_007 + round_id


class Campaign:
    """One campaign: its settings, its folder and its data as they are now. Each step of a round is prepared from
    it (`pixelpick.recipe.Step.prepare`) and computes from that `StepInput` alone."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layout = CampaignLayout(settings.campaign.run_dir)

    @property
    def name(self) -> str:
        return self.settings.campaign.name

    @property
    def simulated(self) -> bool:
        """Labels come from the ground truth (a simulation), not from people."""
        return self.settings.campaign.annotator == "simulated"

    def files(self, round_id: int) -> RoundFiles:
        return self.layout.round(round_id)

    # ---------------------------------------------------------------- data

    @cached_property
    def pool(self) -> SegmentationDataset:
        return get_dataset(self.settings.data, self.settings.data.train_split)

    @cached_property
    def eval_set(self) -> SegmentationDataset | None:
        """The evaluation split, or None when the settings name none (`data.eval_split: null`)."""
        split = self.settings.data.eval_split
        return None if split is None else get_dataset(self.settings.data, split)

    @cached_property
    def image_sizes(self) -> dict[str, tuple[int, int]]:
        return {image_id: self.pool.image_size(image_id) for image_id in self.pool.image_ids}

    # ---------------------------------------------------------------- frozen pools

    def freeze_pool(self, round_id: int) -> str | None:
        """Record the images round `round_id` draws from, unless it has started already (history is never
        rewritten). Returns, and logs, one line when the pool changed otherwise than by new photos since the
        previous round, naming the photos and the rounds that labelled them; None otherwise."""
        path = self.layout.pool(round_id)
        if path.is_file():
            return None
        pool = self._pool_now()
        current = describe_pool(pool, with_masks=self.simulated)
        report = None
        previous = self.pool_manifest(round_id - 1) if round_id > 0 else None
        if previous is not None:
            change = compare(previous, current)
            if change.changed or change.removed:
                labels = read_labels(self.files(round_id - 1).snapshot)
                labelled = labels.groupby("image_id")["round"].unique().map(list).to_dict()
                report = change.describe(round_id, labelled)
                log.warning(report)
            elif change.added:
                log.info("round %d's pool: %d new image(s)", round_id, len(change.added))
        if getattr(pool, "classes_file", None):  # classes from a file may grow: the round keeps its own
            write_json(label_space_record(pool.label_space), self.layout.pool_classes(round_id))
        write_manifest(date(current, previous, round_id), path)
        return report

    def _pool_now(self) -> SegmentationDataset:
        # Listed afresh: a long-lived process (a served flow) must see the photos that arrived since it opened this.
        return get_dataset(self.settings.data, self.settings.data.train_split)

    def pool_manifest(self, round_id: int) -> pd.DataFrame | None:
        """Round `round_id`'s frozen pool, dated (`pools.date`), or None before the round has started. A manifest
        written before pools were dated is dated from the earlier rounds' manifests, which never change."""
        path = self.layout.pool(round_id)
        if round_id < 0 or not path.is_file():
            return None
        manifest = read_manifest(path)
        if "since" in manifest:
            return manifest
        return date(manifest, self.pool_manifest(round_id - 1), round_id)

    # ---------------------------------------------------------------- where things are

    def probability_store(self, round_id: int) -> str:
        """Where round `round_id`'s probability store lives: its round folder, or under `campaign.store_url`."""
        return self.layout.probability_store(round_id, self.settings.campaign.store_url)

    def recorded_settings(self) -> dict[str, Any]:
        """The settings as the campaign's record holds them (paths relative to its folder): what checkpoints carry."""
        return settings_record(self.settings, self.layout.dir)

    def recipe_settings(self) -> dict[str, Any]:
        """The recorded settings without the keys that may change (`CHANGEABLE_KEYS`): what a model records, so
        that extending a campaign or moving it to another machine leaves every output's bytes as they were."""
        record = self.recorded_settings()
        for dotted in CHANGEABLE_KEYS:
            section, key = dotted.split(".")
            record[section].pop(key, None)
        return record


# -------------------------------------------------------------------------------------------------------------------
# Opening a campaign


def open_campaign(
    params: str | Path = "params.yaml", overrides: dict[str, Any] | None = None, *, create: bool = True
) -> Campaign:
    """The campaign that `params` plus `overrides` name, created (recorded) on first use when `create`.

    An existing campaign is opened from its record; CampaignError names the keys if the settings given differ from
    it. The settings given are the whole of `params` when that file names the campaign, else only the `overrides`:
    the file is then just the template other campaigns were started from (`--campaign my-photos` reopens that
    campaign whatever the file holds). A larger `campaign.rounds` extends the record. A new campaign's data is
    checked before anything is written.
    """
    settings = load_settings(params, overrides)
    layout = CampaignLayout(settings.campaign.run_dir)
    if layout.params.is_file():
        named_by_file = load_settings(params).campaign.name == settings.campaign.name
        given = None if named_by_file else set(overrides or {}) - {"campaign.name"}
        campaign = _reopen(settings, layout, given)
        # A recorded campaign in a fresh clone: its generated data at its own root.
        prepare_data(campaign.settings, campaign_dir=layout.dir)
        return campaign
    if not create:
        raise CampaignError(f"campaign {settings.campaign.name!r} has not started: no {layout.params}")
    planned = _planned_image_size(settings)
    if planned is not None:  # known before any data is read or generated
        _check_fits(settings, {"every image": planned})
    prepare_data(settings, campaign_dir=layout.dir)
    campaign = Campaign(settings)
    check_against_data(campaign)
    write_record(settings, layout)
    check_label_space(settings, layout)  # records the classes it starts with
    log.info("started campaign %s in %s", settings.campaign.name, layout.dir)
    return Campaign(load_record(layout))


def open_recorded(campaign_dir: str | Path) -> Campaign:
    """The campaign whose folder is `campaign_dir`, from its record alone (what a pipeline stage runs on)."""
    layout = CampaignLayout(Path(campaign_dir).resolve())
    if not layout.params.is_file():
        raise CampaignError(f"{layout.dir} is not a campaign folder: it has no params.yaml")
    recorded = load_record(layout)
    check_label_space(recorded, layout)
    prepare_data(recorded, campaign_dir=layout.dir)
    return Campaign(recorded)


def load_record(layout: CampaignLayout) -> Settings:
    """A campaign's recorded settings. A record that is empty, damaged or incomplete is refused in one line, never
    completed with defaults: defaults would be another campaign, run (and its data generated) in this folder."""
    path = layout.params
    restore = f"restore it (`git checkout -- {path}`, or from a backup); it is never replaced by defaults"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise CampaignError(f"campaign record {path} cannot be read ({error}); {restore}") from None
    if not text.strip():
        raise CampaignError(f"campaign record {path} is empty ({len(text.encode())} bytes); {restore}")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise CampaignError(f"campaign record {path} is damaged: {_yaml_problem(error)}; {restore}") from None
    if not isinstance(raw, dict):
        raise CampaignError(f"campaign record {path} is damaged: it holds a {type(raw).__name__}, not the settings; "
                            f"{restore}")
    missing = sorted(set(flatten(json.loads(Settings().model_dump_json()))) - set(flatten(raw)))
    if missing:
        more = f" and {len(missing) - 1} other keys" if len(missing) > 1 else ""
        raise CampaignError(f"campaign record {path} is incomplete: it lacks {missing[0]}{more}; {restore}")
    return load_settings(path)


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"not valid YAML ({getattr(error, 'problem', None) or type(error).__name__}{where})"


def _reopen(settings: Settings, layout: CampaignLayout, given: set[str] | None) -> Campaign:
    """The recorded campaign, checked against the settings given: every key, or only the dotted keys in `given`."""
    recorded = load_record(layout)
    check_label_space(recorded, layout)  # before anything is written: a changed class refuses the whole run
    prefixes = {"train" if key == _PRESET_KEY else key for key in given or ()}  # a preset sets the section

    def was_given(key: str) -> bool:
        return given is None or any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)

    differences = {key: values for key, values in recipe_differences(recorded, settings).items() if was_given(key)}
    if differences:
        listed = "; ".join(f"{key}: {old!r} recorded, {new!r} given" for key, (old, new) in differences.items())
        raise CampaignError(
            f"campaign {settings.campaign.name!r} was started with other settings ({listed}). Give a new campaign "
            f"another name (--set campaign.name=...), or edit {layout.params} and run `dvc repro` in that folder "
            "to redo what the change affects")
    updated = with_values(recorded, {key: _value(settings, key) for key in CHANGEABLE_KEYS if was_given(key)})
    if updated != recorded:
        write_record(updated, layout)
    return Campaign(updated)


def recipe_differences(recorded: Settings, given: Settings) -> dict[str, tuple[str, str]]:
    """{key: (recorded, given)} for every setting that differs, ignoring those a recorded campaign may change."""
    ignored = {_PRESET_KEY, *CHANGEABLE_KEYS}
    old, new = (flatten(json.loads(s.model_dump_json())) for s in (recorded, given))
    return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if key not in ignored and old.get(key) != new.get(key)}


def _value(settings: Settings, dotted: str) -> Any:
    node: Any = settings
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def with_values(settings: Settings, values: dict[str, Any]) -> Settings:
    """`settings` with the dotted keys in `values` replaced (already validated values, of a `Settings`)."""
    for dotted, value in values.items():
        *sections, leaf = dotted.split(".")
        chain = [settings]
        for part in sections:
            chain.append(getattr(chain[-1], part))
        node = chain[-1].model_copy(update={leaf: value})
        for parent, part in zip(reversed(chain[:-1]), reversed(sections)):
            node = parent.model_copy(update={part: node})
        settings = node
    return settings


def settings_record(settings: Settings, base: Path) -> dict[str, Any]:
    """The settings as plain data with every path relative to `base`, presets expanded (`train.preset` None)."""
    record = json.loads(settings.model_dump_json())
    record["train"]["preset"] = None  # every preset value is spelled out below it
    for dotted in _PATH_KEYS:
        section, key = dotted.split(".")
        value = record[section][key]
        if value is not None:
            record[section][key] = os.path.relpath(value, base)
    return record


def write_record(settings: Settings, layout: CampaignLayout) -> Path:
    header = (f"# The settings of campaign {settings.campaign.name}, recorded when it started. Every step of its\n"
              "# rounds reads them; paths are relative to this folder. Edit a value and run `dvc repro` here to redo\n"
              "# what it affects.\n")
    text = header + yaml.safe_dump(settings_record(settings, layout.dir), sort_keys=False)
    return atomic_write(layout.params, lambda f: f.write(text.encode()))


def prepare_data(settings: Settings, *, campaign_dir: Path | None = None) -> None:
    """Generate the bundled synthetic dataset where a campaign's settings ask for it and it is missing, saying so.

    Only a new campaign's settings or a recorded campaign's record reach here: a recorded campaign refuses another
    `data.root`, so a mistyped root is generated only for a campaign that has just been named, and announced.
    Nothing is generated inside the campaign's own folder (`campaign_dir`): its record points outside it."""
    data = settings.data
    if data.dataset != "synthetic" or (data.root / "synthetic.json").is_file():
        return
    if campaign_dir is not None and Path(data.root).resolve().is_relative_to(Path(campaign_dir).resolve()):
        raise CampaignError(f"data.root: {data.root} is inside campaign folder {campaign_dir} and holds no dataset; "
                            "a dataset is never generated inside a campaign folder (check its params.yaml)")
    log.warning("generating the bundled synthetic dataset at %s (data.root), first use", data.root)
    s = data.synthetic
    generate_synthetic(data.root, num_train=s.num_train, num_val=s.num_val, height=s.height, width=s.width,
                       seed=s.seed)


def check_against_data(campaign: Campaign) -> None:
    """Refuse, naming the setting, what the data cannot hold: an empty pool, a missing evaluation split, per-image
    budgets larger than an image."""
    settings = campaign.settings
    try:
        pool = campaign.pool
    except DatasetError as error:
        raise CampaignError(f"the pool (data.root, data.train_split): {error}") from None
    if len(pool) == 0:
        raise CampaignError(f"data.train_split: split {settings.data.train_split!r} of {settings.data.root} has no "
                            "images")
    try:
        campaign.eval_set  # noqa: B018  (opening it is the check)
    except DatasetError as error:
        raise CampaignError(f"data.eval_split: {error} (set data.eval_split: null to run without evaluation)") from None
    _check_fits(settings, campaign.image_sizes)


def _planned_image_size(settings: Settings) -> tuple[int, int] | None:
    """Every pool image's working (H, W) when the settings alone say it: a fixed `data.image_size`, or the size
    of the synthetic dataset they generate. None when only the data can tell."""
    data = settings.data
    if data.image_size is not None:
        return data.image_size
    if data.dataset == "synthetic" and not (data.root / "synthetic.json").is_file():
        return data.synthetic.height, data.synthetic.width
    return None


def _check_fits(settings: Settings, image_sizes: dict[str, tuple[int, int]]) -> None:
    """Refuse, naming the key, a per-image budget larger than an image or a training crop outside one."""
    c, a = settings.campaign, settings.acquire
    total = c.initial_pixels_per_image + c.rounds * a.pixels_per_image
    name, (height, width) = min(image_sizes.items(), key=lambda item: item[1][0] * item[1][1])
    shown = name if name == "every image" else f"image {name!r}"
    if total > height * width:
        raise CampaignError(
            f"acquire.pixels_per_image: {c.initial_pixels_per_image} + {c.rounds} x {a.pixels_per_image} = {total} "
            f"pixels per image over the campaign, but {shown} has only {height * width}")
    crop = settings.train.crop_size
    if crop is not None:
        lowest = min(size[0] for size in image_sizes.values())
        narrowest = min(size[1] for size in image_sizes.values())
        if crop[0] > lowest or crop[1] > narrowest:
            raise CampaignError(f"train.crop_size: {list(crop)} does not fit within the images: the smallest are "
                                f"{lowest} pixels high and {narrowest} wide")

