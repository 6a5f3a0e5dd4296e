"""The label-efficiency benchmark: strategies against each other and against full supervision, under one recipe.

A benchmark is a preset (the recipe: dataset, size, model, epochs, budgets, seeds) and a plan of runs:

- one fully supervised run per seed, trained on every pixel under the same schedule as an active-learning run:
  with warm starts, round by round for the same epochs, evaluated after each round, so every budget has a
  reference that trained exactly as long (the last round is the longest-trained model); without, once;
- one active-learning run per (strategy, variant, seed): a campaign whose round r has `step` x (r + 1) labelled
  pixels per image, run with the round recipe of `pixelpick.recipe`. A variant adds settings to the preset's
  (`+cb1`: class-balanced selection, `+sp300`: superpixel expansion, ...; see `VARIANT_KEYS`).

Round 0 is the same random draw for every strategy of a seed, so strategies are compared paired; a run starts
from a finished round 0 of another run of its seed, whose steps the recipe then finds fresh when their settings
and inputs are the same (and redoes otherwise). Every run resumes from its files: the recipe skips fresh steps, so
an interrupted benchmark resumes where it stopped and ends with the same numbers. Stage seconds come from the
recipe's step records. Each run writes its rows (one per budget) to `<workdir>/<run>/result.json` when it finishes.
The report (`pixelpick.benchmark_report`) is a pure function of the rows.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from pixelpick import steps
from pixelpick.campaign import Campaign, load_record, prepare_data, recipe_differences, write_record
from pixelpick.errors import BenchmarkError, CampaignLockedError
from pixelpick.io import write_json
from pixelpick.layout import CampaignLayout
from pixelpick.locking import campaign_lock, held_elsewhere
from pixelpick.recipe import Step, run_round
from pixelpick.reporting import read_metrics
from pixelpick.settings import AcquireSettings, Settings, load_settings, settings_from_dict, step_reads
from pixelpick.training import resolve_device

log = logging.getLogger(__name__)

FULL = "full"  # the strategy name of the fully supervised reference
STRATEGIES = (*get_args(AcquireSettings.model_fields["strategy"].annotation), FULL)  # what a plan may name
STAGES = ("inference", "scoring", "selection", "labelling", "training", "evaluation")
EXPANSION_PREFIXES = ("superpixel_", "propagation_")  # the train step's expansion metrics (`pixelpick.expansion`)

# Short names of the settings a variant may change, as they appear in run names (`margin+cb1+sp300-s0`).
VARIANT_KEYS = {
    "mc": "acquire.mc_samples",  # MC-dropout passes (BALD joins the plan)
    "cb": "acquire.class_balance",  # class-balanced selection, power p
    "md": "acquire.min_distance",  # picks at least d pixels apart
    "sp": "train.superpixels",  # superpixel expansion, about n superpixels per image
    "st": "train.self_training_threshold",  # self-training on predictions at least this confident
    "ss": "train.superpixel_sieve",  # drop superpixel expansion the previous model gives the class below this
    "fp": "train.propagation_threshold",  # feature-space propagation: cosine similarity at least this
    "fr": "train.propagation_radius",  # ... within this many pixels of the click (0: anywhere in the image)
    "ep": "train.epochs",  # the fine-tuning epochs of each round after the first
}
_SELECTION_VARIANTS = {"mc", "cb", "md"}  # mean nothing to random selection or full supervision


@dataclass(frozen=True)
class BenchmarkPreset:
    """A recipe. `overrides` are dotted settings keys applied over params.yaml (command-line --set wins)."""

    name: str
    description: str
    overrides: dict[str, Any]
    step: int  # labelled pixels per image added each round; the first round draws `step` at random
    rounds: int  # budgets: step, 2 step, ..., rounds x step pixels per image
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    warm_start: bool  # False re-initialises every round (the paper); True fine-tunes the previous round's model

    @property
    def budgets(self) -> list[int]:
        return [self.step * (r + 1) for r in range(self.rounds)]

    @property
    def full_supervision_rounds(self) -> int:
        """Rounds of the fully supervised run: one per budget when AL models fine-tune round after round."""
        return self.rounds if self.warm_start else 1


# The `cpu` preset's extra supervision per click, beyond superpixels: the switch a tuning-split comparison flips
# (e.g. {"train.superpixel_sieve": 0.1}). Empty: on the tuning split no sieve or propagation gained more over the
# preset than its spread over 3 seeds (docs/benchmarks/README.md, "Choosing the default on the tuning split").
CPU_DEFAULT_EXPANSION: dict[str, Any] = {}

PRESETS: dict[str, BenchmarkPreset] = {
    "paper": BenchmarkPreset(
        name="paper",
        description="the paper's CamVid recipe: 360x480, DeepLabv3+ MobileNetV2, 50 epochs per round from a fresh "
        "model, 10 px/img per round up to 100, 4 strategies, 5 seeds. For a GPU; the paper's numbers also assume an "
        "ImageNet-pretrained backbone (set model.pretrained_path).",
        overrides={"data.dataset": "camvid", "data.image_size": None, "model.arch": "deeplabv3plus_mobilenetv2",
                   "train.preset": "paper-camvid", "acquire.top_fraction": 0.05},
        step=10, rounds=10, strategies=("margin", "entropy", "least_confidence", "random"),
        seeds=(0, 1, 2, 3, 4), warm_start=False,
    ),
    "gpu-quick": BenchmarkPreset(
        name="gpu-quick",
        description="the paper's model and resolution (DeepLabv3+ MobileNetV2 at 360x480) sized for a short GPU "
        "lease: margin, random and full supervision, one seed, 20 px/img per round up to 100, 10 epochs for round 0 "
        "and 4 per later round, fine-tuning the previous round's model.",
        overrides={"data.dataset": "camvid", "data.image_size": None, "model.arch": "deeplabv3plus_mobilenetv2",
                   "train.preset": "paper-camvid", "train.epochs": 4, "train.initial_epochs": 10,
                   "train.schedule": "poly", "train.batch_size": 8, "train.eval_batch_size": 16,
                   "train.num_workers": 8, "acquire.top_fraction": 0.05},
        step=20, rounds=5, strategies=("margin", "random"), seeds=(0,), warm_start=True,
    ),
    "cpu": BenchmarkPreset(
        name="cpu",
        description="a 2-core CPU recipe: CamVid at 120x160, LR-ASPP MobileNetV3 from random initialisation, "
        "clicks spread over their SLIC superpixels (about 300 per image); round 0 trains 50 epochs, each later round "
        "fine-tunes the previous round's model for 10; 20 px/img per round up to 100, 3 seeds.",
        overrides={"data.dataset": "camvid", "data.image_size": [120, 160], "model.arch": "lraspp_mobilenetv3",
                   "train.preset": "cpu-camvid", "train.initial_epochs": 50, "train.epochs": 10,
                   "train.superpixels": 300, "acquire.top_fraction": 0.05, **CPU_DEFAULT_EXPANSION},
        step=20, rounds=5, strategies=("margin", "random"), seeds=(0, 1, 2), warm_start=True,
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """One run of the plan: a strategy (or `full`), a seed, and a variant: ((short name, value), ...) of
    `VARIANT_KEYS`, applied over the preset's settings."""

    strategy: str
    seed: int
    variant: tuple[tuple[str, float], ...] = ()

    @property
    def label(self) -> str:
        """The strategy as reported: `margin`, or `margin+cb1+sp300` for a variant."""
        shown = [(code, value) for code, value in self.variant if not (code == "mc" and self.strategy == "bald")]
        return self.strategy + "".join(f"+{code}{value:g}" for code, value in shown)

    @property
    def name(self) -> str:
        """The run's folder and campaign name: `margin_cb1_sp300-s0` (a campaign name has no `+`)."""
        return f"{self.label.replace('+', '_')}-s{self.seed}"

    @property
    def overrides(self) -> dict[str, Any]:
        return {VARIANT_KEYS[code]: int(value) if value == int(value) else value for code, value in self.variant}


def parse_variant(text: str) -> tuple[tuple[str, float], ...]:
    """`sp300+st0.9` -> (("sp", 300.0), ("st", 0.9)); BenchmarkError for an unknown short name or value."""
    parts = []
    for part in filter(None, text.split("+")):
        code = part.rstrip("0123456789.")
        if code not in VARIANT_KEYS or code == part:
            raise BenchmarkError(f"variant {text!r}: {part!r} is not one of {sorted(VARIANT_KEYS)} followed by a "
                                 "number, e.g. sp300 or cb1")
        try:
            parts.append((code, float(part[len(code):])))
        except ValueError:
            raise BenchmarkError(f"variant {text!r}: {part!r} has no number after {code!r}") from None
    return tuple(parts)


def plan_runs(
    preset: BenchmarkPreset,
    strategies: tuple[str, ...] | None = None,
    seeds: tuple[int, ...] | None = None,
    variants: tuple[tuple[tuple[str, float], ...], ...] = (),
) -> list[RunSpec]:
    """Every run, seed by seed (full supervision last), so a benchmark cut short still holds whole seeds.

    `strategies` names the runs (`full` for full supervision); by default the preset's strategies, then full
    supervision, the reference every share in the report divides by. An ablation that names its strategies only
    runs those: its shares then come from a full-supervision run of an earlier benchmark in the same folder.
    Each variant runs every strategy it means something to: selection variants (mc, cb, md) the uncertainty
    strategies only, training variants (sp, st, ss, fp, fr, ep) every strategy. A variant with MC-dropout passes
    adds BALD.
    """
    named = tuple(strategies or (*preset.strategies, FULL))
    unknown = [strategy for strategy in named if strategy not in STRATEGIES]
    if unknown:
        raise BenchmarkError(f"unknown strategy {unknown[0]!r}: choose from {', '.join(STRATEGIES)}")
    learners = [strategy for strategy in named if strategy != FULL]
    runs = []
    for seed in seeds if seeds is not None else preset.seeds:
        runs.extend(RunSpec(strategy, seed) for strategy in learners)
        for variant in variants:
            selection_only = any(code in _SELECTION_VARIANTS for code, _ in variant)
            chosen = [s for s in learners if not (selection_only and s == "random")]
            if any(code == "mc" and value >= 2 for code, value in variant):
                chosen.append("bald")
            runs.extend(RunSpec(strategy, seed, variant) for strategy in chosen)
        if FULL in named:
            runs.append(RunSpec(FULL, seed))
    return list(dict.fromkeys(runs))


# Where a benchmark trains and what it is measured on. `tune` chooses settings: it trains on 80% of `train` and
# evaluates on the other, fixed 20% (`pixelpick.datasets.camvid.tuning_names`), so val is never looked at while
# choosing; `report` measures the chosen settings: all of `train`, evaluated on val.
PROTOCOLS: dict[str, dict[str, str]] = {
    "report": {"data.train_split": "train", "data.eval_split": "val"},
    "tune": {"data.train_split": "train-tune", "data.eval_split": "tune"},
}


def protocol_of(settings: Settings) -> str:
    """`tune` or `report` when the splits are one of `PROTOCOLS`, else `<train split>-><eval split>`."""
    splits = {"data.train_split": settings.data.train_split, "data.eval_split": settings.data.eval_split}
    return next((name for name, chosen in PROTOCOLS.items() if chosen == splits),
                f"{settings.data.train_split}->{settings.data.eval_split}")


def benchmark_settings(
    params: str | Path, preset: BenchmarkPreset, workdir: Path, overrides: dict[str, Any] | None = None,
    protocol: str = "report",
) -> Settings:
    """The benchmark's base settings: params.yaml, then the preset, then the protocol's splits, then the caller's
    overrides."""
    if protocol not in PROTOCOLS:
        raise BenchmarkError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    merged = {**preset.overrides, **PROTOCOLS[protocol], "train.warm_start": preset.warm_start,
              "campaign.workdir": str(workdir), **(overrides or {})}
    return load_settings(params, merged)


def run_settings(base: Settings, preset: BenchmarkPreset, spec: RunSpec) -> Settings:
    """The settings of one run: its own campaign folder, strategy, seed, variant and budget schedule."""
    raw = json.loads(base.model_dump_json())
    raw["train"]["preset"] = None  # the base already holds every value of its preset
    raw["campaign"].update(name=spec.name, seed=spec.seed, initial_pixels_per_image=preset.step,
                           rounds=preset.rounds - 1, error_rate=0.0, annotator="simulated")
    raw["acquire"].update(strategy="margin" if spec.strategy == FULL else spec.strategy,  # full never queries
                          pixels_per_image=preset.step)
    for dotted, value in spec.overrides.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return settings_from_dict(raw, source=f"benchmark run {spec.name}")


# -------------------------------------------------------------------------------------------- full supervision


def _pool_files(c: Campaign) -> dict[str, Path]:
    images, masks = c.pool.source_paths()
    return {f"pool_{i}": path for i, path in enumerate(images + masks)}


def _eval_files(c: Campaign) -> dict[str, Path]:
    images, masks = c.eval_set.source_paths()
    return {f"eval_{i}": path for i, path in enumerate(images + masks)}


# The fully supervised reference, as steps of the same kind as the recipe's: dense training, then evaluation.
DENSE_TRAIN = Step(
    "train-dense",
    lambda c, r: step_reads("train", role="recipe"),  # what training reads in any round
    lambda c, r: {**_pool_files(c), **({"previous_model": c.files(r - 1).model}
                                       if r > 0 and c.settings.train.warm_start else {})},
    lambda c, r: {"model": c.files(r).model},
    steps.train,  # with no snapshot among its inputs: on every pixel's ground truth
    lambda c, r: {"training_state": str(c.files(r).training_state)},
    reads="train",
    records_recipe=True,
)
DENSE_EVALUATE = Step(
    "evaluate-dense",
    lambda c, r: step_reads("evaluate", role="recipe"),
    lambda c, r: {"model": c.files(r).model, **_pool_files(c), **_eval_files(c)},
    lambda c, r: {"metrics": c.files(r).metrics},
    steps.evaluate,  # with no snapshot among its inputs: the label statistics of every pixel
    reads="evaluate",
    metrics=True,
)


# ------------------------------------------------------------------------------------------------------ the runs


def run_benchmark_run(base: Settings, preset: BenchmarkPreset, spec: RunSpec, progress: bool = False) -> Path:
    """Run (or resume) one run of the plan; returns its `result.json`: one row per budget. The run's lock is held
    throughout: CampaignLockedError if another process is running it."""
    settings = run_settings(base, preset, spec)
    layout = CampaignLayout(settings.campaign.run_dir)
    layout.dir.mkdir(parents=True, exist_ok=True)
    with campaign_lock(layout.lock, layout.dir.name):
        return _run_locked(settings, preset, spec, progress)


def _run_locked(settings: Settings, preset: BenchmarkPreset, spec: RunSpec, progress: bool) -> Path:
    prepare_data(settings)
    campaign = Campaign(settings)
    result_path = campaign.layout.dir / "result.json"
    _check_recipe(campaign)
    if result_path.exists():
        return result_path
    if spec.strategy == FULL:
        rows = [_round_row(campaign, r, run_round(campaign, r, progress=progress, steps=(DENSE_TRAIN, DENSE_EVALUATE)))
                for r in range(preset.full_supervision_rounds)]
    else:
        _start_from_shared_round_zero(campaign, spec)
        rows = [_round_row(campaign, r, run_round(campaign, r, progress=progress)) for r in range(preset.rounds)]
    trained = 0
    for row in rows:  # the budget a row stands for: full supervision's rounds are the references of the AL rounds'
        row["budget"] = preset.budgets[row["round"]] if len(rows) > 1 else None
        trained = trained + row["epochs"] if settings.train.warm_start else row["epochs"]
        row["epochs"] = trained  # epochs trained in all, up to this round
    context = {"dataset": settings.data.dataset, "preset": preset.name, "strategy": spec.label, "seed": spec.seed,
               "protocol": protocol_of(settings), "arch": settings.model.arch,
               "image_size": _image_size(campaign), "device": str(resolve_device(settings.train.device)),
               "epochs_per_round": settings.train.epochs,
               "epochs_round_0": settings.train.initial_epochs or settings.train.epochs}
    return write_json({"rows": [{**context, **row} for row in rows]}, result_path)


def read_rows(result_paths: list[Path]) -> list[dict[str, Any]]:
    return [row for path in result_paths for row in json.loads(Path(path).read_text())["rows"]]


def _check_recipe(campaign: Campaign) -> None:
    """A run folder holds one recipe (its params.yaml): resuming it under other settings is refused."""
    layout = campaign.layout
    if layout.params.is_file():
        differences = recipe_differences(load_record(layout), campaign.settings)
        if differences:
            raise BenchmarkError(f"benchmark run {layout.dir} was started with other settings "
                                 f"({', '.join(differences)} differ): pass another --workdir, or delete that run "
                                 "to start it afresh")
    else:
        write_record(campaign.settings, layout)


def _start_from_shared_round_zero(campaign: Campaign, spec: RunSpec) -> None:
    """Copy a finished round 0 of another active-learning run of the same seed, when this run has none: the recipe
    then finds its steps fresh if their settings and inputs match, and redoes those that do not."""
    target = campaign.files(0).dir
    if target.exists():
        return
    for sibling in _round_zero_siblings(campaign.layout.dir, spec.seed):
        source = CampaignLayout(sibling).round(0)
        if not source.step_record("evaluate").is_file():
            continue
        staging = target.with_name(f".{target.name}.copying")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source.dir, staging, ignore=shutil.ignore_patterns(source.probs.name, ".*"))
        staging.rename(target)
        return


def _round_zero_siblings(run_dir: Path, seed: int) -> list[Path]:
    """The other active-learning runs of this seed, whose round 0 a run may start from."""
    return [sibling for sibling in sorted(run_dir.parent.glob(f"*-s{seed}"))
            if sibling != run_dir and not sibling.name.startswith(f"{FULL}-")]


def busy_with(base: Settings, preset: BenchmarkPreset, spec: RunSpec) -> str | None:
    """Why this run cannot start now, when another process keeps it from starting: it is running the run, or it is
    training the round 0 this run would start from (two processes working through one plan). None: it may start."""
    layout = CampaignLayout(run_settings(base, preset, spec).campaign.run_dir)
    if (layout.dir / "result.json").exists():
        return None
    holder = held_elsewhere(layout.lock)
    if holder is not None:
        return f"{layout.dir.name} is being run by {holder}"
    if spec.strategy != FULL and not layout.round(0).dir.exists():
        for sibling in _round_zero_siblings(layout.dir, spec.seed):
            holder = held_elsewhere(CampaignLayout(sibling).lock)
            if holder is not None and not CampaignLayout(sibling).round(0).step_record("evaluate").is_file():
                return f"{layout.dir.name} starts from the round 0 that {holder} is training for {sibling.name}"
    return None


def _wait_for_others(reasons: list[str]) -> None:
    log.info("waiting: %s", "; ".join(reasons))
    time.sleep(60)


def run_plan(plan: list[RunSpec], run: Callable[[RunSpec], Path], busy: Callable[[RunSpec], str | None],
             wait: Callable[[list[str]], None] = _wait_for_others) -> Iterator[tuple[RunSpec, Path]]:
    """Each run of the plan in order, yielded with its result file when it has finished. A run that another process
    keeps busy (`busy` says why) is passed over and taken up again later, once finished or free; when every run left
    is busy, `wait` is called with the reasons. So processes given the same plan share its runs."""
    pending = list(plan)
    while pending:
        passed_over: dict[RunSpec, str] = {}
        for spec in pending:
            reason = busy(spec)
            if reason is None:
                try:
                    yield spec, run(spec)
                    continue
                except CampaignLockedError as error:  # another process took the run since `busy` looked
                    reason = str(error)
            passed_over[spec] = reason
        if passed_over and len(passed_over) == len(pending):
            wait(list(passed_over.values()))
        pending = list(passed_over)


_STAGE_OF_STEP = {"annotate": "labelling", "ingest": "labelling"}


def _round_row(campaign: Campaign, round_id: int, results: list) -> dict[str, Any]:
    """mIoU, per-class IoU, labelled pixels and the seconds of each stage of one round, from its step records."""
    seconds = dict.fromkeys(STAGES, 0.0)
    for result in results:
        for part, value in result.seconds.items():
            stage = part if part in seconds else _STAGE_OF_STEP.get(result.step, part)
            seconds[stage] = seconds.get(stage, 0.0) + value
    metrics = read_metrics(campaign.files(round_id).metrics)
    ious = {f"iou_{name}": iou for name, iou in zip(metrics["class_names"], metrics["iou_per_class"])}
    details = next((r.details for r in results if r.step.startswith("train")), {})
    # How many labels each click's expansions added and how many of them the ground truth agrees with.
    expansion = {key: value for key, value in details.items() if key.startswith(EXPANSION_PREFIXES)}
    # The benchmark's budget axis, as in the paper: labelled pixels per image so far.
    return {"round": round_id, "pixels_per_image": metrics["labelled_per_image"], "miou": metrics["miou"], **ious,
            "epochs": details.get("epochs"), **expansion,
            **{f"{stage}_s": round(seconds[stage], 3) for stage in STAGES}}


def _image_size(campaign: Campaign) -> str:
    height, width = campaign.pool.image_size(campaign.pool.image_ids[0])
    return f"{height}x{width}"


def run_benchmark(
    base: Settings,
    preset: BenchmarkPreset,
    plan: list[RunSpec],
    progress: bool = False,
    on_run: Callable[[RunSpec, Path], None] | None = None,
) -> list[Path]:
    """Every run of the plan, in plain Python (`run_plan`: runs another process is running are waited for);
    `on_run` sees each finished run's result file."""
    results = []
    for spec, path in run_plan(plan, lambda spec: run_benchmark_run(base, preset, spec, progress),
                               lambda spec: busy_with(base, preset, spec)):
        if on_run is not None:
            on_run(spec, path)
        results.append(path)
    return results
