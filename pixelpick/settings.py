"""The one settings object: `params.yaml` loaded into typed, validated, frozen sections.

Library code never reads `params.yaml`; entry points load it once with `load_settings` and pass sections inward.
Relative paths are resolved against the folder holding the params file, so a flow started from another working
directory (a served deployment, a `dvc repro` in a copy of the repo) still finds the same files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

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

# ---------------------------------------------------------------------------------------------- settings roles
# Every field says here, once, what it is for; the recipe's step keys, the keys a recorded campaign may change, the
# paths written relative to a campaign's folder and the MLflow params are all derived from it (`roles()`).
#   recipe:   changes what is computed; a step that reads it has it in its key (and DVC stage params).
#   runtime:  how fast or on what to run (device, workers, batch sizes for inference, resume points): in no key,
#             and a recorded campaign takes a new value.
#   location: where things are (paths, URLs, names): in no key (inputs are keyed by content), so a moved project
#             redoes nothing.
# `steps` maps each step that reads the field to the rounds in which it does (every round, round 0 only, or
# rounds after 0). What also depends on a value, such as which of `train.epochs` and `train.initial_epochs`
# round 0 trains, stays in the recipe's code.
STEPS = ("query", "annotate", "ingest", "train", "evaluate")
EVERY, FIRST, LATER = "every", "first", "later"  # the rounds in which a step reads a field


def _role(role: str, steps: tuple[str, ...], scoped: dict[str, str], may_change: bool) -> dict[str, Any]:
    unknown = (set(steps) | set(scoped)) - set(STEPS)
    if unknown or not set(scoped.values()) <= {EVERY, FIRST, LATER}:
        raise ValueError(f"unknown steps or rounds in {steps} {scoped}")
    return {"role": role, "steps": {**{step: EVERY for step in steps}, **scoped}, "may_change": may_change}


def recipe(*steps: str, may_change: bool = False, **scoped: str) -> dict[str, Any]:
    """A recipe field read by `steps` in every round and by `scoped` steps in the rounds named. `may_change`: a
    recorded campaign takes a new value because no output of a round depends on it (`campaign.rounds`)."""
    return _role("recipe", steps, scoped, may_change)


def runtime(*steps: str, **scoped: str) -> dict[str, Any]:
    return _role("runtime", steps, scoped, True)


def location(*steps: str, may_change: bool = False, **scoped: str) -> dict[str, Any]:
    """`may_change`: a recorded campaign takes a new value (where stores and caches go); other locations are
    refused, as another data root or campaign folder is another campaign."""
    return _role("location", steps, scoped, may_change)


def _field(default: Any, role: dict[str, Any], **constraints: Any) -> Any:
    return Field(default, json_schema_extra={"pixelpick": role}, **constraints)


class _Section(BaseModel):
    # extra="forbid" turns a misspelt key into a start-up error instead of a silently ignored value.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSettings(_Section):
    # What the generated data holds: steps read the generated files, by content, not these values.
    num_train: StrictInt = _field(240, recipe(), ge=1)
    num_val: StrictInt = _field(60, recipe(), ge=1)
    height: StrictInt = _field(96, recipe(), ge=32)
    width: StrictInt = _field(128, recipe(), ge=32)
    seed: StrictInt = _field(0, recipe())


class DataSettings(_Section):
    dataset: Literal["synthetic", "camvid", "cityscapes", "voc", "folder"] = _field("synthetic", recipe(*STEPS))
    root: Path = _field(Path("data/synthetic"), location(*STEPS))
    train_split: str = _field("train", recipe(*STEPS))
    # None: no evaluation (a round reports its labels, and no mIoU)
    eval_split: str | None = _field("val", recipe("evaluate"))
    image_size: Size | None = _field(None, recipe(*STEPS))  # working (H, W); None keeps the native size
    cityscapes_downsample: Annotated[Literal[1, 2, 4], BeforeValidator(_not_a_boolean)] = _field(4, recipe(*STEPS))
    # What is derived from the images once and kept (superpixels)
    cache_dir: Path = _field(Path("data/cache"), location("train", may_change=True))
    classes_file: Path | None = _field(None, location(*STEPS))
    synthetic: SyntheticSettings = SyntheticSettings()


class ModelSettings(_Section):
    # Round 0 queries at random: only later rounds' queries read the previous model.
    arch: Literal["deeplabv3plus_mobilenetv2", "lraspp_mobilenetv3", "deeplabv3_resnet50"] = _field(
        "deeplabv3plus_mobilenetv2", recipe("train", "evaluate", query=LATER))
    pretrained_path: Path | None = _field(None, location("train"))  # keyed by the file's content
    dropout_p: Float = _field(0.2, recipe("train", "evaluate", query=LATER), ge=0.0, lt=1.0)


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
    preset: str | None = _field("cpu-synthetic", recipe())  # expanded into the keys below when loaded
    # The epochs of each round after round 0, and of round 0 too while `initial_epochs` is None. Round 0 trains
    # `initial_epochs` when it is set (the recipe keys each round on the one it trains); see docs/benchmarks.
    epochs: StrictInt = _field(15, recipe("train"), ge=1)
    batch_size: StrictInt = _field(8, recipe("train"), ge=1)
    optimizer: Literal["adam", "sgd"] = _field("adam", recipe("train"))
    lr_backbone: Float = _field(3e-3, recipe("train"), gt=0)
    lr_head: Float = _field(3e-3, recipe("train"), gt=0)
    weight_decay: Float = _field(1e-4, recipe("train"), ge=0)
    momentum: Float = _field(0.9, recipe("train"), ge=0, lt=1)
    schedule: Literal["multistep", "poly", "constant"] = _field("poly", recipe("train"))
    milestones: list[Annotated[StrictInt, Field(ge=0)]] = _field([20, 40], recipe("train"))
    gamma: Float = _field(0.1, recipe("train"), gt=0, le=1)
    crop_size: Size | None = _field(None, recipe("train"))
    scale_range: tuple[Float, Float] = _field((0.75, 1.25), recipe("train"))
    hflip_p: Float = _field(0.5, recipe("train"), ge=0, le=1)
    photometric: StrictBool = _field(False, recipe("train"))
    # False: re-initialise every round, as the paper does. Round 0 has no previous model to start from.
    warm_start: StrictBool = _field(False, recipe(train=LATER))
    # Round 0's epochs (None: `epochs`). Round 0 learns from scratch; later rounds, warm-started, need fewer.
    initial_epochs: StrictInt | None = _field(None, recipe("train"), ge=1)
    # Superpixel expansion: > 0 spreads each click's class over its SLIC superpixel (about this many per image);
    # the expanded pixels of a superpixel share the weight `superpixel_weight`, against 1 for the click. 0 = off.
    superpixels: StrictInt = _field(0, recipe("train"), ge=0)
    superpixel_compactness: Float = _field(10.0, recipe("train"), gt=0)
    superpixel_weight: Float = _field(1.0, recipe("train"), gt=0)
    # More supervision per click from the previous round's model (`pixelpick.expansion`); 0 = off, and round 0 (no
    # previous model) does neither. Sieve: drop superpixel-expanded pixels the previous model gives the click's class
    # a probability below this. Propagation: a click's class goes to the pixels of its image whose embedding has
    # cosine similarity >= the threshold with the click's, within the radius (px; 0 = anywhere in the image); a
    # click's propagated pixels share `propagation_weight`.
    superpixel_sieve: Float = _field(0.0, recipe(train=LATER), ge=0, lt=1)
    propagation_threshold: Float = _field(0.0, recipe(train=LATER), ge=0, lt=1)
    propagation_radius: StrictInt = _field(0, recipe(train=LATER), ge=0)
    propagation_weight: Float = _field(0.5, recipe(train=LATER), gt=0)
    # Self-training: > 0 adds the previous round's confident predictions (max probability >= this) on unlabelled
    # pixels as extra targets, their loss weighted `self_training_weight`. 0 = off; round 0 has no previous round.
    self_training_threshold: Float = _field(0.0, recipe(train=LATER), ge=0, lt=1)
    self_training_weight: Float = _field(0.5, recipe(train=LATER), gt=0)
    device: Literal["auto", "cpu", "cuda"] = _field("auto", runtime("query", "train", "evaluate"))
    num_workers: StrictInt = _field(0, runtime("train"), ge=0)
    # Images per inference batch (queries, evaluation, self-training's teacher): what fits in memory.
    eval_batch_size: StrictInt = _field(8, runtime("query", "train", "evaluate"), ge=1)
    # Epochs between resume points, so a killed training continues.
    checkpoint_every: StrictInt = _field(5, runtime("train"), ge=1)
    # > 1: data-parallel training in this many processes (torch DDP, torchrun); the global batch is the same, the
    # order of the sums is not, so it is part of the recipe.
    processes: StrictInt = _field(1, recipe("train"), ge=1)

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
    # Round 0 queries at random: the acquisition function is read by later rounds only.
    strategy: Literal["margin", "entropy", "least_confidence", "random", "bald"] = _field("margin", recipe(query=LATER))
    # Pixels asked per image in each round after round 0 (the budget of one round, not the running total).
    pixels_per_image: StrictInt = _field(10, recipe(query=LATER), ge=1)
    top_fraction: Float = _field(0.05, recipe(query=LATER), ge=0.0, le=1.0)  # 0 = plain top-k, no diversity draw
    # 0 = one deterministic pass; T > 1 = MC-dropout passes
    mc_samples: StrictInt = _field(0, recipe(query=LATER), ge=0)
    # 0 = off. p > 0 weights each pixel's score by the model's expected inverse frequency, among the labels so far,
    # of the pixel's class, to the power p: rare classes reach the pool of candidates more often.
    class_balance: Float = _field(0.0, recipe(query=LATER), ge=0.0)
    # 0 = off. d > 0 spreads an image's picks: no two closer than d pixels while the pool allows it.
    min_distance: Float = _field(0.0, recipe(query=LATER), ge=0.0)
    # Simulated campaigns only: never query pixels whose ground truth is void (round 0's random picks too).
    exclude_void: StrictBool = _field(True, recipe("query"))

    @model_validator(mode="after")
    def _bald_needs_samples(self) -> AcquireSettings:
        if self.strategy == "bald" and self.mc_samples < 2:
            raise ValueError("strategy 'bald' needs mc_samples >= 2 (it is the disagreement between MC passes)")
        return self


class CampaignSettings(_Section):
    name: str = _field("synthetic-margin", location(*STEPS), pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    workdir: Path = _field(Path("data/runs"), location(*STEPS))  # each campaign gets the folder <workdir>/<name>
    # Where probability stores go: None = each round's folder; a shared path or fsspec URL (s3://...) that every
    # worker of a cluster reaches, as <store_url>/<campaign>/rNN/probs.zarr.
    store_url: str | None = _field(None, location("query", may_change=True))
    # Rounds whose store is kept (the newest); None keeps them all
    keep_stores: StrictInt | None = _field(None, runtime("query"), ge=1)
    # Who labels: the ground truth, or people (a job file); it also decides the round's steps.
    annotator: Literal["simulated", "human"] = _field("simulated", recipe("query"))
    # Round 0's random pixels per image; later rounds ask `acquire.pixels_per_image` each.
    initial_pixels_per_image: StrictInt = _field(10, recipe(query=FIRST), ge=1)
    # Query rounds after the initial random one: a recorded campaign may be extended.
    rounds: StrictInt = _field(3, recipe(may_change=True), ge=0)
    error_rate: Float = _field(0.0, recipe("annotate"), ge=0.0, le=1.0)  # simulated annotator noise
    # > 0: after round 0 the simulated annotator is shown the previous model's class and takes it unchecked with
    # this probability, right or wrong (pixelpick/annotator.py); 0 shows no suggestions. The annotate step names it
    # only when it is set, so recipes without suggestions stay as they were.
    suggestion_trust: Float = _field(0.0, recipe(annotate=LATER), ge=0.0, le=1.0)
    seed: StrictInt = _field(0, recipe("query", "annotate", "train"))

    @property
    def run_dir(self) -> Path:
        return self.workdir / self.name


class Settings(_Section):
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    acquire: AcquireSettings = AcquireSettings()
    campaign: CampaignSettings = CampaignSettings()


@dataclass(frozen=True)
class Role:
    """What one dotted settings key is for (see `recipe`, `runtime`, `location`)."""

    key: str
    role: str  # recipe | runtime | location
    steps: dict[str, str]  # step -> the rounds it reads the key in (EVERY, FIRST or LATER)
    may_change: bool  # a recorded campaign takes a new value
    is_path: bool  # written relative to the campaign's folder in its record

    def read_by(self, step: str, round_id: int) -> bool:
        rounds = self.steps.get(step)
        return rounds == EVERY or (rounds == FIRST and round_id == 0) or (rounds == LATER and round_id > 0)


def _walk(model: type[BaseModel], prefix: str = "") -> list[Role]:
    found = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.extend(_walk(annotation, f"{prefix}{name}."))
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        declared = extra.get("pixelpick")
        if declared is None:
            raise TypeError(f"settings field {prefix}{name} declares no role (recipe, runtime or location)")
        is_path = annotation is Path or Path in get_args(annotation)
        found.append(Role(f"{prefix}{name}", declared["role"], dict(declared["steps"]), declared["may_change"],
                          is_path))
    return found


@cache
def roles() -> dict[str, Role]:
    """Every settings key's role, in the order the settings declare them."""
    return {role.key: role for role in _walk(Settings)}


def keys_with(role: str) -> tuple[str, ...]:
    return tuple(key for key, r in roles().items() if r.role == role)


def step_reads(step: str, round_id: int | None = None, role: str | None = None) -> tuple[str, ...]:
    """The keys `step` reads (in round `round_id`; in any round when None), optionally only those of `role`."""
    return tuple(key for key, r in roles().items()
                 if (role is None or r.role == role)
                 and (r.read_by(step, round_id) if round_id is not None else step in r.steps))


class UndeclaredSetting(AttributeError):
    """A step read a setting its declaration does not list."""


class SettingsView:
    """The settings as one step sees them: reading a key outside `keys` raises `UndeclaredSetting`, so a step that
    starts depending on a setting cannot do so without declaring it (and having it in its key)."""

    def __init__(self, settings: BaseModel, keys: Iterable[str], prefix: str = "") -> None:
        object.__setattr__(self, "_settings", settings)
        object.__setattr__(self, "_keys", frozenset(keys))
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        settings, keys, prefix = self._settings, self._keys, self._prefix
        if name not in type(settings).model_fields:
            if name.startswith("model_"):  # pydantic's API (model_dump, model_copy...) hands out a whole section
                raise UndeclaredSetting(f"{prefix}{name}: a step reads the settings it declares one by one, never "
                                        "a whole section")
            return getattr(settings, name)  # the section's own properties
        dotted = f"{prefix}{name}"
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            return SettingsView(value, keys, f"{dotted}.")
        if dotted not in keys:
            raise UndeclaredSetting(f"{dotted} is read by a step that does not declare it "
                                    "(declare it in pixelpick/settings.py)")
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("settings are frozen")

    def __reduce__(self) -> tuple[Any, ...]:
        # Without it pickle would look up __setstate__ through __getattr__ before the fields exist.
        return (SettingsView, (self._settings, self._keys, self._prefix))

    def replaced(self, **values: Any) -> SettingsView:
        """This view with some of its declared fields given other values: what one computation runs with (round
        0 trains `train.initial_epochs` as its epochs)."""
        for name in values:
            getattr(self, name)  # UndeclaredSetting unless the step declares it
        return SettingsView(self._settings.model_copy(update=values), self._keys, self._prefix)


def load_settings(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Settings:
    """Load `path` into `Settings`, apply dotted-key `overrides` (`{"train.epochs": 2}`) and resolve paths.

    Raises `SettingsError` naming every invalid key.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise SettingsError(f"settings file not found: {path.absolute()}") from exc  # which folder was searched
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
