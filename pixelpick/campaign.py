"""A campaign: its recorded settings, its folder, and what every step of its rounds shares.

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

import torch
import yaml

from pixelpick.checkpoints import model_from_checkpoint, read_checkpoint
from pixelpick.datasets import get_dataset
from pixelpick.datasets.base import SegmentationDataset
from pixelpick.datasets.synthetic import generate_synthetic
from pixelpick.errors import CampaignError, DatasetError
from pixelpick.io import atomic_write
from pixelpick.label_space import check_label_space
from pixelpick.labels import LabelStore
from pixelpick.layout import CampaignLayout, RoundFiles
from pixelpick.models import build_model
from pixelpick.settings import Settings, flatten, load_settings
from pixelpick.training import resolve_device

log = logging.getLogger(__name__)

# Keys that say how fast or on what to run, not what to compute: they never make a campaign "another recipe".
RUNTIME_KEYS = ("train.device", "train.num_workers", "train.eval_batch_size", "train.checkpoint_every")
_PATH_KEYS = ("data.root", "data.classes_file", "data.cache_dir", "model.pretrained_path", "campaign.workdir")



def round_seed(seed: int, round_id: int) -> int:
    """One seed per (campaign, round), so any round can be re-run on its own with the same randomness."""
    return seed * 10_007 + round_id


class Campaign:
    """One campaign's settings and folder, and the datasets, device and models its steps share (built lazily)."""

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

    def label_store(self, round_id: int) -> LabelStore:
        """The label table as of `round_id`: its file is that round's snapshot."""
        space = self.pool.label_space
        return LabelStore(self.files(round_id).snapshot, image_sizes=self.image_sizes,
                          num_classes=space.num_classes, ignore_index=space.ignore_index)

    # ---------------------------------------------------------------- models

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.settings.train.device)

    def new_model(self) -> torch.nn.Module:
        m = self.settings.model
        return build_model(m.arch, self.pool.label_space.num_classes, pretrained_path=m.pretrained_path,
                           dropout_p=m.dropout_p)

    def load_model(self, path: Path) -> torch.nn.Module:
        return model_from_checkpoint(read_checkpoint(path)).to(self.device)

    def recorded_settings(self) -> dict[str, Any]:
        """The settings as the campaign's record holds them (paths relative to its folder): what checkpoints carry."""
        return settings_record(self.settings, self.layout.dir)


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
        prepare_data(campaign.settings)  # a recorded campaign in a fresh clone: its generated data at its own root
        return campaign
    if not create:
        raise CampaignError(f"campaign {settings.campaign.name!r} has not started: no {layout.params}")
    prepare_data(settings)
    campaign = Campaign(settings)
    check_against_data(campaign)
    write_record(settings, layout)
    check_label_space(settings, layout)  # records the classes it starts with
    log.info("started campaign %s in %s", settings.campaign.name, layout.dir)
    return Campaign(load_settings(layout.params))


def open_recorded(campaign_dir: str | Path) -> Campaign:
    """The campaign whose folder is `campaign_dir`, from its record alone (what a pipeline stage runs on)."""
    layout = CampaignLayout(Path(campaign_dir).resolve())
    if not layout.params.is_file():
        raise CampaignError(f"{layout.dir} is not a campaign folder: it has no params.yaml")
    recorded = load_settings(layout.params)
    check_label_space(recorded, layout)
    prepare_data(recorded)
    return Campaign(recorded)


def _reopen(settings: Settings, layout: CampaignLayout, given: set[str] | None) -> Campaign:
    """The recorded campaign, checked against the settings given: every key, or only the dotted keys in `given`."""
    recorded = load_settings(layout.params)
    check_label_space(recorded, layout)  # before anything is written: a changed class refuses the whole run
    prefixes = {"train" if key == "train.preset" else key for key in given or ()}  # a preset sets the section

    def was_given(key: str) -> bool:
        return given is None or any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)

    differences = {key: values for key, values in recipe_differences(recorded, settings).items() if was_given(key)}
    if differences:
        listed = "; ".join(f"{key}: {old!r} recorded, {new!r} given" for key, (old, new) in differences.items())
        raise CampaignError(
            f"campaign {settings.campaign.name!r} was started with other settings ({listed}). Give a new campaign "
            f"another name (--set campaign.name=...), or edit {layout.params} and run `dvc repro` in that folder "
            "to redo what the change affects")
    # The number of rounds, where stores go and the runtime keys may change: no step's output depends on them.
    runtime = {key.split(".")[1]: getattr(settings.train, key.split(".")[1]) for key in RUNTIME_KEYS if was_given(key)}
    changeable = {key: getattr(settings.campaign, key) for key in ("rounds", "store_url", "keep_stores")
                  if was_given(f"campaign.{key}")}
    updated = recorded.model_copy(update={
        "campaign": recorded.campaign.model_copy(update=changeable),
        "train": recorded.train.model_copy(update=runtime)})
    if updated != recorded:
        write_record(updated, layout)
    return Campaign(updated)


def recipe_differences(recorded: Settings, given: Settings) -> dict[str, tuple[str, str]]:
    """{key: (recorded, given)} for every setting that differs, ignoring `campaign.rounds` and runtime keys."""
    ignored = {"campaign.rounds", "train.preset", "campaign.store_url", "campaign.keep_stores", *RUNTIME_KEYS}
    old, new = (flatten(json.loads(s.model_dump_json())) for s in (recorded, given))
    return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if key not in ignored and old.get(key) != new.get(key)}


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


def prepare_data(settings: Settings) -> None:
    """Generate the bundled synthetic dataset where a campaign's settings ask for it and it is missing, saying so.

    Only a new campaign's settings or a recorded campaign's record reach here: a recorded campaign refuses another
    `data.root`, so a mistyped root is generated only for a campaign that has just been named, and announced."""
    data = settings.data
    if data.dataset != "synthetic" or (data.root / "synthetic.json").is_file():
        return
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
        raise CampaignError(f"data.train_split: {error}") from None
    if len(pool) == 0:
        raise CampaignError(f"data.train_split: split {settings.data.train_split!r} of {settings.data.root} has no "
                            "images")
    try:
        campaign.eval_set  # noqa: B018  (opening it is the check)
    except DatasetError as error:
        raise CampaignError(f"data.eval_split: {error} (set data.eval_split: null to run without evaluation)") from None
    c, a = settings.campaign, settings.acquire
    total = c.initial_pixels_per_image + c.rounds * a.pixels_per_image
    smallest = min(campaign.image_sizes.items(), key=lambda item: item[1][0] * item[1][1])
    pixels = smallest[1][0] * smallest[1][1]
    if total > pixels:
        raise CampaignError(
            f"acquire.pixels_per_image: {c.initial_pixels_per_image} + {c.rounds} x {a.pixels_per_image} = {total} "
            f"pixels per image over the campaign, but image {smallest[0]!r} has only {pixels}")

