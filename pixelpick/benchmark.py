"""The label-efficiency benchmark: strategies against each other and against full supervision, under one recipe.

A benchmark is a preset (the recipe: dataset, size, model, epochs, budgets, seeds) and a plan of runs:

- one fully supervised run per seed, trained on every pixel under the same schedule as an active-learning run:
  with warm starts, round by round for the same epochs, evaluated after each round, so every budget has a
  reference that trained exactly as long; without, once, for as many epochs as one round;
- one active-learning run per (strategy, seed): a campaign whose round r has (r + 1) x `step` labelled pixels
  per image. Round 0 is the same random draw for every strategy of a seed, so strategies are compared paired,
  and it is trained once per seed: later runs of the seed copy it.

Each run writes its rows (one per budget) to `<workdir>/<run>/result.json` when it finishes, and each round its
stage timings to `timings.json` beside the round's other files. A re-started benchmark skips finished runs and
rounds, so an interrupted one resumes where it stopped and ends with the same numbers.
The report (`pixelpick.benchmark_report`) is a pure function of the rows.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from pixelpick.campaign import Campaign, RoundPaths, json_safe
from pixelpick.io import write_json
from pixelpick.errors import BenchmarkError
from pixelpick.settings import Settings, flatten, load_settings
from pixelpick.training import evaluate

FULL = "full"  # the strategy name of the fully supervised reference
STAGES = ("inference", "scoring", "selection", "labelling", "training", "evaluation")


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


PRESETS: dict[str, BenchmarkPreset] = {
    "paper": BenchmarkPreset(
        name="paper",
        description="the paper's CamVid recipe (protocol §1.4, §6): 360x480, DeepLabv3+ MobileNetV2, 50 epochs "
        "per round from a fresh model, 10 px/img per round up to 100, 5 seeds. For a GPU; the paper's numbers "
        "also assume an ImageNet-pretrained backbone (set model.pretrained_path).",
        overrides={"data.dataset": "camvid", "data.image_size": None, "model.arch": "deeplabv3plus_mobilenetv2",
                   "train.preset": "paper-camvid", "acquire.top_fraction": 0.05},
        step=10, rounds=10, strategies=("margin", "entropy", "least_confidence", "random"),
        seeds=(0, 1, 2, 3, 4), warm_start=False,
    ),
    "cpu": BenchmarkPreset(
        name="cpu",
        description="a 2-core CPU recipe: CamVid at 120x160, LR-ASPP MobileNetV3 from random initialisation, "
        "10 epochs per round fine-tuning the previous round's model, 20 px/img per round up to 100, 2 seeds.",
        overrides={"data.dataset": "camvid", "data.image_size": [120, 160], "model.arch": "lraspp_mobilenetv3",
                   "train.preset": "cpu-camvid", "acquire.top_fraction": 0.05},
        step=20, rounds=5, strategies=("margin", "random"), seeds=(0, 1), warm_start=True,
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """One run of the plan: a strategy (or `full`), a seed, and the acquisition's variant (`AcquireSettings`):
    MC-dropout passes, class balance, minimum distance between picks."""

    strategy: str
    seed: int
    mc_samples: int = 0
    class_balance: float = 0.0
    min_distance: float = 0.0

    @property
    def label(self) -> str:
        """The strategy as reported: `margin`; `margin+mc8` with 8 MC-dropout passes; `margin+cb1` class-balanced
        with power 1; `margin+md8` with picks at least 8 pixels apart."""
        label = self.strategy
        if self.mc_samples >= 2 and self.strategy != "bald":
            label += f"+mc{self.mc_samples}"
        if self.class_balance > 0:
            label += f"+cb{self.class_balance:g}"
        if self.min_distance > 0:
            label += f"+md{self.min_distance:g}"
        return label

    @property
    def name(self) -> str:
        return f"{self.label}-s{self.seed}"


def plan_runs(
    preset: BenchmarkPreset,
    strategies: tuple[str, ...] | None = None,
    seeds: tuple[int, ...] | None = None,
    mc_samples: int = 0,
    class_balance: float = 0.0,
    min_distance: float = 0.0,
) -> list[RunSpec]:
    """Every run, seed by seed (full supervision last), so a benchmark cut short still holds whole seeds.

    With `mc_samples` >= 2, each uncertainty strategy also runs with that many MC-dropout passes, and BALD joins.
    With `class_balance` > 0, each uncertainty strategy also runs class-balanced with that power; with
    `min_distance` > 0, with its picks spread that far apart.
    """
    strategies = tuple(strategies or preset.strategies)
    uncertainty = [s for s in strategies if s != "random"]
    runs = []
    for seed in seeds if seeds is not None else preset.seeds:
        runs.extend(RunSpec(strategy, seed) for strategy in strategies)
        if mc_samples >= 2:
            runs.extend(RunSpec(s, seed, mc_samples) for s in uncertainty)
            runs.append(RunSpec("bald", seed, mc_samples))
        if class_balance > 0:
            runs.extend(RunSpec(s, seed, class_balance=class_balance) for s in uncertainty)
        if min_distance > 0:
            runs.extend(RunSpec(s, seed, min_distance=min_distance) for s in uncertainty)
        runs.append(RunSpec(FULL, seed))
    return list(dict.fromkeys(runs))


def benchmark_settings(
    params: str | Path, preset: BenchmarkPreset, workdir: Path, overrides: dict[str, Any] | None = None
) -> Settings:
    """The benchmark's base settings: params.yaml, then the preset, then the caller's overrides."""
    merged = {**preset.overrides, "train.warm_start": preset.warm_start, "campaign.workdir": str(workdir),
              **(overrides or {})}
    return load_settings(params, merged)


def run_settings(base: Settings, preset: BenchmarkPreset, spec: RunSpec) -> Settings:
    """The settings of one run: its own campaign directory, strategy, seed and budget schedule."""
    campaign = base.campaign.model_copy(update={
        "name": spec.name, "seed": spec.seed, "initial_pixels_per_image": preset.step, "rounds": preset.rounds - 1,
        "error_rate": 0.0,
    })
    strategy = "margin" if spec.strategy == FULL else spec.strategy  # full supervision never queries
    acquire = base.acquire.model_copy(update={
        "strategy": strategy, "pixels_per_image": preset.step, "mc_samples": spec.mc_samples,
        "class_balance": spec.class_balance, "min_distance": spec.min_distance,
    })
    return base.model_copy(update={"campaign": campaign, "acquire": acquire})


@dataclass
class StageTimer:
    """Wall seconds per stage of a round."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started


def run_benchmark_run(base: Settings, preset: BenchmarkPreset, spec: RunSpec, progress: bool = False) -> Path:
    """Run (or resume) one run of the plan; returns its `result.json`: one row per budget."""
    settings = run_settings(base, preset, spec)
    campaign = Campaign(settings)
    result_path = campaign.run_dir / "result.json"
    recipe = _check_recipe(campaign, legacy_ok=result_path.exists())
    if result_path.exists():
        return result_path
    if spec.strategy == FULL:
        rows = [_full_supervision_round(campaign, round_id, progress)
                for round_id in range(preset.full_supervision_rounds)]
    else:
        _share_round_zero(campaign, spec, recipe)
        rows = [_timed_round(campaign, round_id, progress) for round_id in range(preset.rounds)]
    # The budget a row stands for: full supervision's rounds are the references of the same AL rounds.
    for row in rows:
        row["budget"] = preset.budgets[row["round"]] if len(rows) > 1 else None
    context = {"dataset": settings.data.dataset, "preset": preset.name, "strategy": spec.label, "seed": spec.seed,
               "arch": settings.model.arch, "image_size": _image_size(campaign), "device": str(campaign.device),
               "epochs_per_round": settings.train.epochs}
    return write_json({"rows": [{**context, **row} for row in rows]}, result_path)


def read_rows(result_paths: list[Path]) -> list[dict[str, Any]]:
    return [row for path in result_paths for row in json.loads(Path(path).read_text())["rows"]]


# Settings that locate files rather than shape results: a run may move, or be resumed from another checkout.
_LOCATIONS = ("data.root", "campaign.workdir", "campaign.labels_dir", "campaign.name")
# What round 0 does not depend on (its pixels are random): where a benchmark's strategies differ.
_STRATEGY_KEYS = ("acquire.strategy", "acquire.mc_samples", "acquire.class_balance", "acquire.min_distance",
                  "acquire.top_fraction", "acquire.pixels_per_image")
_RECIPE_FILE = "settings.json"


def _check_recipe(campaign: Campaign, legacy_ok: bool) -> dict[str, str]:
    """The run's recipe (its settings, less file locations), recorded in `settings.json` when the run starts.
    A run directory holds one recipe: resuming it under other settings raises `BenchmarkError` naming the keys.
    A finished run from before recipes were recorded (`legacy_ok`) is accepted as it is."""
    recipe = {k: v for k, v in flatten(json.loads(campaign.settings.model_dump_json())).items()
              if k not in _LOCATIONS}
    path = campaign.run_dir / _RECIPE_FILE
    if path.exists():
        recorded = json.loads(path.read_text())
        changed = sorted(k for k in recipe.keys() | recorded.keys() if recipe.get(k) != recorded.get(k))
        if changed:
            raise BenchmarkError(
                f"benchmark run {campaign.run_dir} was started with other settings ({', '.join(changed)} differ): "
                "pass another --workdir, or delete that run to start it afresh")
    elif not legacy_ok:
        write_json(recipe, path)
    return recipe


def _share_round_zero(campaign: Campaign, spec: RunSpec, recipe: dict[str, str]) -> None:
    """Start from a finished round 0 of another active-learning run of the same seed and recipe, if there is one:
    round 0 is the same random draw and the same training for every strategy, so it is trained once per seed, not
    once per run. Its timings.json comes along, so the run's round-0 seconds are those of the run that trained it."""
    target = campaign.paths(0).dir
    if (target / "timings.json").exists():
        return
    def round_zero_recipe(recipe: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in recipe.items() if k not in _STRATEGY_KEYS}

    for sibling in sorted(campaign.run_dir.parent.glob(f"*-s{spec.seed}")):
        source = RoundPaths(sibling / "rounds" / "r00")
        finished = all(p.exists() for p in (source.queries, source.model, source.metrics, source.dir / "timings.json"))
        recorded = sibling / _RECIPE_FILE
        if not (finished and recorded.exists()) or sibling == campaign.run_dir or sibling.name.startswith(f"{FULL}-"):
            continue
        if round_zero_recipe(json.loads(recorded.read_text())) == round_zero_recipe(recipe):
            staging = target.with_name(f".{target.name}.copying")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source.dir, staging)
            shutil.rmtree(target, ignore_errors=True)  # an unfinished round 0 of this run
            staging.rename(target)
            return


def _timed_round(campaign: Campaign, round_id: int, progress: bool) -> dict[str, Any]:
    """One round of `Campaign.run_round`, stage by stage, with its timings kept beside the round's files."""
    paths = campaign.paths(round_id)
    timings_path = paths.dir / "timings.json"
    if not (timings_path.exists() and paths.metrics.exists()):
        timer = StageTimer()
        if round_id > 0:
            with timer.stage("inference"):
                campaign.infer(round_id, progress)
            timer.seconds["scoring"] = _scoring_seconds(paths.dir / "infer_log.json")
        with timer.stage("selection"):
            campaign.select(round_id)
        with timer.stage("labelling"):
            campaign.ingest(round_id, campaign.annotate_simulated(round_id))
        with timer.stage("training"):
            campaign.train(round_id, progress)
        with timer.stage("evaluation"):
            campaign.evaluate(round_id, progress)
        write_json(timer.seconds, timings_path)
    metrics = json.loads(paths.metrics.read_text())
    return _row(metrics, json.loads(timings_path.read_text()), round_id,
                pixels_per_image=metrics["pixels_per_image"])


def _full_supervision_round(campaign: Campaign, round_id: int, progress: bool) -> dict[str, Any]:
    """Round `round_id` of full supervision: `Campaign.train` on dense masks of every pool image (fine-tuning the
    previous round's model when the active-learning rounds do), then evaluation. Kept like an AL round's files."""
    settings = campaign.settings
    paths = campaign.paths(round_id)
    timings_path = paths.dir / "timings.json"
    if not (timings_path.exists() and paths.metrics.exists()):
        timer = StageTimer()
        with timer.stage("training"):
            campaign.train(round_id, progress, dense=True)
        with timer.stage("evaluation"):
            model = campaign.load_model(paths.model)
            metrics = evaluate(model, campaign.eval_set, campaign.device, settings.train.eval_batch_size, progress)
        space = campaign.pool.label_space
        labelled = sum(int((campaign.pool.load_mask(i) != space.ignore_index).sum()) for i in campaign.pool.image_ids)
        metrics.update(round=round_id, pixels_per_image=labelled / len(campaign.pool),
                       epochs=settings.train.epochs * (round_id + 1))
        write_json(json_safe(metrics), paths.metrics)
        write_json(timer.seconds, timings_path)
    metrics = json.loads(paths.metrics.read_text())
    row = _row(metrics, json.loads(timings_path.read_text()), round_id, pixels_per_image=metrics["pixels_per_image"])
    return {**row, "epochs": metrics["epochs"]}


def _row(metrics: dict, seconds: dict[str, float], round_id: int | None, pixels_per_image: float) -> dict[str, Any]:
    ious = {f"iou_{name}": iou for name, iou in zip(metrics["class_names"], metrics["iou_per_class"])}
    return {"round": round_id, "pixels_per_image": pixels_per_image, "miou": metrics["miou"], **ious,
            **{f"{stage}_s": round(seconds.get(stage, 0.0), 3) for stage in STAGES}}


def _scoring_seconds(infer_log: Path) -> float:
    return json.loads(infer_log.read_text()).get("scoring_seconds", float("nan")) if infer_log.exists() else float("nan")


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
    """Every run of the plan in order, in plain Python; `on_run` sees each finished run's result file."""
    results = []
    for spec in plan:
        path = run_benchmark_run(base, preset, spec, progress)
        if on_run is not None:
            on_run(spec, path)
        results.append(path)
    return results
