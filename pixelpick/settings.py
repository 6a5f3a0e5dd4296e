"""The one settings object: `params.yaml` loaded into typed, validated, frozen sections.

Library code never reads `params.yaml`; entry points load it once with `load_settings` and pass sections inward.
Relative paths are resolved against the folder holding the params file, so a flow started from another working
directory (a served deployment, a `dvc repro` in a copy of the repo) still finds the same files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)

from pixelpick.errors import SettingsError


def _not_a_boolean(value: Any) -> Any:
    # YAML reads `true` as a boolean, and pydantic would take it for 1 or 1.0: a typo must not become a value.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


Float = Annotated[float, BeforeValidator(_not_a_boolean)]
Positive = Annotated[StrictInt, Field(gt=0)]
Size = tuple[Positive, Positive]  # (H, W) in pixels


class _Section(BaseModel):
    # extra="forbid" turns a misspelt key into a start-up error instead of a silently ignored value.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSettings(_Section):
    num_train: StrictInt = Field(240, ge=1)
    num_val: StrictInt = Field(60, ge=1)
    height: StrictInt = Field(96, ge=32)
    width: StrictInt = Field(128, ge=32)
    seed: StrictInt = 0


class DataSettings(_Section):
    dataset: Literal["synthetic", "camvid", "cityscapes", "voc", "folder"] = "synthetic"
    root: Path = Path("data/synthetic")
    train_split: str = "train"
    eval_split: str | None = "val"  # None: no evaluation (a round reports its labels, and no mIoU)
    image_size: Size | None = None  # working (H, W); None keeps the native size
    cityscapes_downsample: Annotated[Literal[1, 2, 4], BeforeValidator(_not_a_boolean)] = 4
    cache_dir: Path = Path("data/cache")  # what is derived from the images once and kept (superpixels)
    classes_file: Path | None = None
    synthetic: SyntheticSettings = SyntheticSettings()


class ModelSettings(_Section):
    arch: Literal["deeplabv3plus_mobilenetv2", "lraspp_mobilenetv3", "deeplabv3_resnet50"] = (
        "deeplabv3plus_mobilenetv2"
    )
    pretrained_path: Path | None = None
    dropout_p: Float = Field(0.2, ge=0.0, lt=1.0)


# The paper's per-dataset recipes, plus small CPU recipes. A preset fills every key the
# params file leaves out; keys the file sets win. Milestones are the epochs at which the lr drops (the reference
# stepped one epoch late; we do not).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "paper-camvid": dict(
        epochs=50, batch_size=4, optimizer="adam", lr_backbone=5e-5, lr_head=5e-4, weight_decay=2e-4,
        schedule="multistep", milestones=[20, 40], crop_size=(360, 480), scale_range=(0.5, 2.0), photometric=True,
    ),
    "paper-cityscapes": dict(
        epochs=50, batch_size=4, optimizer="adam", lr_backbone=5e-5, lr_head=5e-4, weight_decay=2e-4,
        schedule="poly", crop_size=(256, 512), scale_range=(0.5, 2.0), photometric=True,
    ),
    "paper-voc": dict(
        epochs=50, batch_size=10, optimizer="sgd", lr_backbone=1e-3, lr_head=1e-2, weight_decay=5e-4,
        schedule="poly", crop_size=(320, 320), scale_range=(0.5, 2.0), photometric=True,
    ),
    # Random initialisation on CPU: a higher, uniform lr and no heavy photometric noise converge in few epochs.
    "cpu-synthetic": dict(
        epochs=15, batch_size=8, optimizer="adam", lr_backbone=3e-3, lr_head=3e-3, weight_decay=1e-4,
        schedule="poly", crop_size=None, scale_range=(0.75, 1.25), photometric=False,
    ),
    "cpu-camvid": dict(
        epochs=10, batch_size=8, optimizer="adam", lr_backbone=2e-3, lr_head=2e-3, weight_decay=1e-4,
        schedule="poly", crop_size=None, scale_range=(0.75, 1.25), photometric=False,
    ),

}


class TrainSettings(_Section):
    preset: str | None = "cpu-synthetic"
    epochs: StrictInt = Field(15, ge=1)
    batch_size: StrictInt = Field(8, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr_backbone: Float = Field(3e-3, gt=0)
    lr_head: Float = Field(3e-3, gt=0)
    weight_decay: Float = Field(1e-4, ge=0)
    momentum: Float = Field(0.9, ge=0, lt=1)
    schedule: Literal["multistep", "poly", "constant"] = "poly"
    milestones: list[Annotated[StrictInt, Field(ge=0)]] = [20, 40]
    gamma: Float = Field(0.1, gt=0, le=1)
    crop_size: Size | None = None
    scale_range: tuple[Float, Float] = (0.75, 1.25)
    hflip_p: Float = Field(0.5, ge=0, le=1)
    photometric: StrictBool = False
    warm_start: StrictBool = False  # False: re-initialise every round, as the paper does
    initial_epochs: StrictInt | None = Field(None, ge=1)  # round 0's epochs (None: `epochs`); see docs/benchmarks
    # Superpixel expansion: > 0 spreads each click's class over its SLIC superpixel (about this many per image);
    # the expanded pixels of a superpixel share the weight `superpixel_weight`, against 1 for the click. 0 = off.
    superpixels: StrictInt = Field(0, ge=0)
    superpixel_compactness: Float = Field(10.0, gt=0)
    superpixel_weight: Float = Field(1.0, gt=0)
    # More supervision per click from the previous round's model (`pixelpick.expansion`); 0 = off, and round 0 (no
    # previous model) does neither. Sieve: drop superpixel-expanded pixels the previous model gives the click's class
    # a probability below this. Propagation: a click's class goes to the pixels of its image whose embedding has
    # cosine similarity >= the threshold with the click's, within the radius (px; 0 = anywhere in the image); a
    # click's propagated pixels share `propagation_weight`.
    superpixel_sieve: Float = Field(0.0, ge=0, lt=1)
    propagation_threshold: Float = Field(0.0, ge=0, lt=1)
    propagation_radius: StrictInt = Field(0, ge=0)
    propagation_weight: Float = Field(0.5, gt=0)
    # Self-training: > 0 adds the previous round's confident predictions (max probability >= this) on unlabelled
    # pixels as extra targets, their loss weighted `self_training_weight`. 0 = off.
    self_training_threshold: Float = Field(0.0, ge=0, lt=1)
    self_training_weight: Float = Field(0.5, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: StrictInt = Field(0, ge=0)
    eval_batch_size: StrictInt = Field(8, ge=1)
    checkpoint_every: StrictInt = Field(5, ge=1)  # epochs between resume points, so a killed training continues
    processes: StrictInt = Field(1, ge=1)  # > 1: data-parallel training in this many processes (torch DDP, torchrun)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        if not isinstance(values, dict) or values.get("preset") is None:
            return values
        preset = values["preset"]
        if preset not in TRAIN_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(TRAIN_PRESETS)}")
        return {**TRAIN_PRESETS[preset], **values}

    @model_validator(mode="after")
    def _check_ranges(self) -> TrainSettings:
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        return self


class AcquireSettings(_Section):
    strategy: Literal["margin", "entropy", "least_confidence", "random", "bald"] = "margin"
    pixels_per_image: StrictInt = Field(10, ge=1)
    top_fraction: Float = Field(0.05, ge=0.0, le=1.0)  # 0 = plain top-k, no diversity draw
    mc_samples: StrictInt = Field(0, ge=0)  # 0 = one deterministic pass; T > 1 = MC-dropout passes
    # 0 = off. p > 0 weights each pixel's score by the model's expected inverse frequency, among the labels so far,
    # of the pixel's class, to the power p: rare classes reach the pool of candidates more often.
    class_balance: Float = Field(0.0, ge=0.0)
    # 0 = off. d > 0 spreads an image's picks: no two closer than d pixels while the pool allows it.
    min_distance: Float = Field(0.0, ge=0.0)
    exclude_void: StrictBool = True  # simulated campaigns only: never query pixels whose ground truth is void

    @model_validator(mode="after")
    def _bald_needs_samples(self) -> AcquireSettings:
        if self.strategy == "bald" and self.mc_samples < 2:
            raise ValueError("strategy 'bald' needs mc_samples >= 2 (it is the disagreement between MC passes)")
        return self


class CampaignSettings(_Section):
    name: str = Field("synthetic-margin", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    workdir: Path = Path("data/runs")  # each campaign gets the folder <workdir>/<name>
    # Where probability stores go: None = each round's folder; a shared path or fsspec URL (s3://...) that every
    # worker of a cluster reaches, as <store_url>/<campaign>/rNN/probs.zarr.
    store_url: str | None = None
    keep_stores: StrictInt | None = Field(None, ge=1)  # rounds whose store is kept (the newest); None keeps them all
    annotator: Literal["simulated", "human"] = "simulated"  # who labels: the ground truth, or people (a job file)
    initial_pixels_per_image: StrictInt = Field(10, ge=1)
    rounds: StrictInt = Field(3, ge=0)  # query rounds after the initial random one
    error_rate: Float = Field(0.0, ge=0.0, le=1.0)  # simulated annotator noise
    # > 0: after round 0 the simulated annotator is shown the previous model's class and takes it unchecked with
    # this probability, right or wrong (pixelpick/annotator.py); 0 shows no suggestions.
    suggestion_trust: Float = Field(0.0, ge=0.0, le=1.0)
    seed: StrictInt = 0

    @property
    def run_dir(self) -> Path:
        return self.workdir / self.name


class Settings(_Section):
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    acquire: AcquireSettings = AcquireSettings()
    campaign: CampaignSettings = CampaignSettings()


def load_settings(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Settings:
    """Load `path` into `Settings`, apply dotted-key `overrides` (`{"train.epochs": 2}`) and resolve paths.

    Raises `SettingsError` naming every invalid key.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise SettingsError(f"settings file not found: {path}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SettingsError(f"{path} is not valid YAML ({getattr(exc, 'problem', None) or exc}{where})") from exc
    if not isinstance(raw, dict):
        raise SettingsError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    settings = settings_from_dict(raw, source=str(path))
    return resolve_paths(settings, path.resolve().parent)


def settings_from_dict(raw: dict[str, Any], source: str = "settings") -> Settings:
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: "
            f"{error['msg'].removeprefix('Value error, ')}{_given(error)}"
            for error in exc.errors()
        )
        raise SettingsError(f"invalid settings in {source}: {problems}") from None


def _given(error: dict[str, Any]) -> str:
    value = error.get("input")
    return f" (got {value!r})" if isinstance(value, (bool, int, float, str)) or value is None else ""


def resolve_paths(settings: Settings, base: Path) -> Settings:
    """Make the settings' relative paths absolute against `base`."""

    def absolute(p: Path | None) -> Path | None:
        return None if p is None else Path(os.path.normpath(base / p))

    data = settings.data.model_copy(
        update={
            "root": absolute(settings.data.root) or settings.data.root,
            "classes_file": absolute(settings.data.classes_file) or settings.data.classes_file,
            "cache_dir": absolute(settings.data.cache_dir) or settings.data.cache_dir,
        }
    )
    model = settings.model.model_copy(
        update={"pretrained_path": absolute(settings.model.pretrained_path) or settings.model.pretrained_path}
    )
    campaign = settings.campaign.model_copy(
        update={"workdir": absolute(settings.campaign.workdir) or settings.campaign.workdir}
    )
    return settings.model_copy(update={"data": data, "model": model, "campaign": campaign})


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a command-line `key=value` override; the value is read as YAML (`train.epochs=2`)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SettingsError(f"override {text!r} must look like section.key=value")
    return key.strip(), yaml.safe_load(value)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SettingsError(f"cannot set {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as {"train.epochs": "10", ...}: dotted keys, values as text."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
