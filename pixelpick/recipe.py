"""The recipe of a round, declared once: its ordered steps, and what each reads and writes.

Every way of running a round goes through this declaration: the plain-Python loop here, the Prefect flows (one
task per step, cached on `step_key`), `dvc repro` (one templated stage per step, filled in from the same
declaration), and the benchmark (which reads each step's seconds from its record). A step depends on exactly:

- the settings keys it reads (`Step.settings`), by value;
- its input files and folders: the dataset files it reads, the previous round's snapshot and model, the round's
  queries or label batch, by content (md5).

Those make the step's key. After a step runs, a record beside its outputs (`rounds/rNN/steps/<step>.json`) keeps
the key, the md5 of every output and the seconds it took. A step is fresh, and is skipped, only when its key is
unchanged and every output still has the digest recorded, so a deleted or damaged output is remade, with
everything after it. Location settings (paths), `campaign.rounds` and runtime settings (device, workers) are in no
key: moving a project, extending a campaign or changing machines redoes nothing.

The label source is a parameter of the recipe: simulated campaigns label each round with the `annotate` step;
human campaigns ingest the round's batch file (`labels/rNN.parquet`, written by `pixelpick.human`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixelpick import labelling
from pixelpick.campaign import Campaign
from pixelpick.digests import file_md5
from pixelpick.distributed import is_main_process
from pixelpick.errors import StepInputError
from pixelpick.io import write_json
from pixelpick.provenance import code_version
from pixelpick.reporting import read_metrics, write_progress
from pixelpick.settings import SettingsView, step_reads
from pixelpick.step_input import Runtime, StepInput, missing_input_hint

log = logging.getLogger(__name__)


def _steps():
    # The steps import torch; deciding whether anything needs to run (keys, records) must not wait for it.
    from pixelpick import steps

    return steps


def _reads(step: str) -> Callable[[Campaign, int], tuple[str, ...]]:
    """The recipe keys `step` reads in a round, as pixelpick/settings.py declares them: the step's key."""
    return lambda c, r: step_reads(step, r, role="recipe")


Paths = dict[str, Path]


def _nothing(c: Campaign, r: int) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Step:
    """One step: its name, the recipe keys in its key, its inputs and outputs (named paths, given the campaign and
    the round), the function that runs it on its `StepInput`, and where it may keep what is not an output.
    `reads`: the step whose declared settings it reads (pixelpick/settings.py), when not its own name. `metrics`:
    its output is a small metrics file. `records_recipe`: its output says which recipe made it (a checkpoint), so
    its input carries the campaign's recipe record."""

    name: str
    settings: Callable[[Campaign, int], tuple[str, ...]]
    inputs: Callable[[Campaign, int], Paths]
    outputs: Callable[[Campaign, int], Paths]
    run: Callable[[StepInput], dict[str, Any]]
    scratch: Callable[[Campaign, int], dict[str, str]] = _nothing
    reads: str | None = None
    metrics: bool = False
    records_recipe: bool = False

    def prepare(self, campaign: Campaign, round_id: int, runtime: Runtime | None = None) -> StepInput:
        """Everything the step of round `round_id` computes from, and nothing more: the one value every way of
        running it (loop, DVC stage, Prefect task, Dask shard, DDP process) starts from."""
        keyed = self.settings(campaign, round_id)
        return StepInput(
            step=self.name, round_id=round_id,
            settings=SettingsView(campaign.settings, {*step_reads(self.reads or self.name, round_id), *keyed}),
            keyed=keyed,
            inputs=self.inputs(campaign, round_id), outputs=self.outputs(campaign, round_id),
            scratch=self.scratch(campaign, round_id), manifest=campaign.pool_manifest(round_id),
            simulated=campaign.simulated, provenance=campaign.recipe_settings() if self.records_recipe else {},
            runtime=runtime or Runtime())


def _pool(c: Campaign, r: int) -> Paths:
    """The round's frozen pool (which images, as they were: `pixelpick.pools`) and the file the label space is read
    from, if any. Steps depend on these, never on the folder, which keeps growing."""
    frozen_classes = getattr(c.pool, "classes_file", None) and c.layout.pool_classes(r)
    return {"pool": c.layout.pool(r), **({"classes": frozen_classes} if frozen_classes else {})}


def _previous(c: Campaign, r: int, what: str) -> Paths:
    return {} if r == 0 else {f"previous_{what}": getattr(c.files(r - 1), what)}


def _query_inputs(c: Campaign, r: int) -> Paths:
    return {**_pool(c, r), **_previous(c, r, "model"), **_previous(c, r, "snapshot")}


def _query_scratch(c: Campaign, r: int) -> dict[str, str]:
    # The round's store, and the earlier rounds' (`campaign.keep_stores` removes the oldest once this one selected).
    return {"probability_store": c.probability_store(r),
            **{f"probability_store_{q}": c.probability_store(q) for q in range(r)}}


def _batch(c: Campaign, r: int) -> Path:
    return c.files(r).annotations if c.simulated else c.layout.batch(r)


def _train_inputs(c: Campaign, r: int) -> Paths:
    t = c.settings.train
    uses_previous = (t.warm_start or t.self_training_threshold > 0 or t.superpixel_sieve > 0
                     or t.propagation_threshold > 0)
    pretrained = c.settings.model.pretrained_path
    # The round's pool dates each image (`pools.date`): it is all training needs to leave stale labels out.
    return {"snapshot": c.files(r).snapshot, **_pool(c, r),
            **(_previous(c, r, "model") if uses_previous else {}), **({"pretrained": pretrained} if pretrained else {})}


def _train_scratch(c: Campaign, r: int) -> dict[str, str]:
    files = c.files(r)
    return {"training_state": str(files.training_state), "distributed_input": str(files.distributed_input),
            "distributed_report": str(files.distributed_report)}


def _evaluate_inputs(c: Campaign, r: int) -> Paths:
    files = {"model": c.files(r).model, "snapshot": c.files(r).snapshot, **_pool(c, r)}
    if c.eval_set is not None:
        images, masks = c.eval_set.source_paths()
        images = [path for path in images if path != getattr(c.eval_set, "classes_file", None)]  # the round's, above
        files.update({f"eval_images_{i}": p for i, p in enumerate(images)})
        files.update({f"eval_masks_{i}": p for i, p in enumerate(masks) if p.exists()})
    return files


def _annotate_settings(c: Campaign, r: int) -> tuple[str, ...]:
    # suggestion_trust is named only when set, so the recipes of campaigns without suggestions stay as they were.
    trusting = r > 0 and c.settings.campaign.suggestion_trust
    return tuple(key for key in step_reads("annotate", r, role="recipe")
                 if key != "campaign.suggestion_trust" or trusting)


def _train_settings(c: Campaign, r: int) -> tuple[str, ...]:
    # Which epochs key a round trains depends on a value: round 0 trains `initial_epochs` when it is set (and
    # reads both while it is None), later rounds `epochs`.
    if r > 0:
        unread = "train.initial_epochs"
    else:
        unread = "train.epochs" if c.settings.train.initial_epochs is not None else None
    return tuple(key for key in step_reads("train", r, role="recipe") if key != unread)


QUERY = Step("query", _reads("query"), _query_inputs, lambda c, r: {"queries": c.files(r).queries},
             lambda step: _steps().query(step), _query_scratch)
ANNOTATE = Step(
    "annotate",
    _annotate_settings,
    # Suggestions come from the previous model's probabilities: a person who trusts them answers after that model.
    lambda c, r: {"queries": c.files(r).queries, **_pool(c, r),
                  **(_previous(c, r, "model") if c.settings.campaign.suggestion_trust else {})},
    lambda c, r: {"annotations": c.files(r).annotations},
    labelling.annotate,
    lambda c, r: {"probability_store": c.probability_store(r)},  # the suggestions, when trusted
)
INGEST = Step(
    "ingest",
    _reads("ingest"),
    lambda c, r: {"batch": _batch(c, r), "queries": c.files(r).queries, **_previous(c, r, "snapshot"),
                  **_pool(c, r)},
    lambda c, r: {"snapshot": c.files(r).snapshot},
    labelling.ingest,
)
TRAIN_STEP = Step("train", _train_settings, _train_inputs, lambda c, r: {"model": c.files(r).model},
                  lambda step: _steps().train(step), _train_scratch, records_recipe=True)
EVALUATE = Step(
    "evaluate",
    _reads("evaluate"),
    _evaluate_inputs,
    lambda c, r: {"metrics": c.files(r).metrics},
    lambda step: _steps().evaluate(step),
    metrics=True,
)
STEPS = {step.name: step for step in (QUERY, ANNOTATE, INGEST, TRAIN_STEP, EVALUATE)}


def round_steps(campaign: Campaign) -> list[Step]:
    """The ordered steps of a round: a simulated campaign annotates its queries itself; a human one ingests the
    batch people made."""
    if campaign.simulated:
        return [QUERY, ANNOTATE, INGEST, TRAIN_STEP, EVALUATE]
    return [QUERY, INGEST, TRAIN_STEP, EVALUATE]


# ---------------------------------------------------------------------------------------------- keys and records


def is_history(campaign: Campaign, step: Step, round_id: int) -> bool:
    """Whether the step's outputs are history, never recomputed: a human round's queries once its job has been
    exported (people were asked about exactly those pixels). Everything else is derived."""
    return step is QUERY and not campaign.simulated and campaign.files(round_id).job.is_file()


def step_key(campaign: Campaign, step: Step, round_id: int) -> str:
    """What the step's outputs are a function of: the step, the round, its settings values, input digests and the
    code. History keeps the key it was made under, whatever changed since."""
    if is_history(campaign, step, round_id):
        record = read_record(campaign, step, round_id)
        if record is not None:
            return record["key"]
    return step.prepare(campaign, round_id).key()


def check_can_start(campaign: Campaign, round_id: int) -> None:
    """StepInputError unless the previous round has made what round `round_id` starts from."""
    needed = {**_previous(campaign, round_id, "model"), **_previous(campaign, round_id, "snapshot")}
    for name, path in needed.items():
        if not path.is_file():
            raise StepInputError(f"round {round_id} needs {path}, which does not exist" + missing_input_hint(name))


@dataclass(frozen=True)
class StepResult:
    step: str
    round: int
    fresh: bool  # True when the step was skipped because its outputs were up to date
    outputs: dict[str, str]  # output name -> md5
    seconds: dict[str, float]
    details: dict[str, Any]


def read_record(campaign: Campaign, step: Step, round_id: int) -> dict[str, Any] | None:
    path = campaign.files(round_id).step_record(step.name)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def is_fresh(campaign: Campaign, step: Step, round_id: int, key: str | None = None) -> bool:
    """Whether the step's outputs are what its current inputs and settings make: same key, same output digests."""
    record = read_record(campaign, step, round_id)
    if record is None or record.get("key") != (key or step_key(campaign, step, round_id)):
        return False
    outputs = step.outputs(campaign, round_id)
    return all(path.is_file() and file_md5(path) == record["outputs"].get(name) for name, path in outputs.items())


def begin_step(campaign: Campaign, step: Step, round_id: int, *, force: bool = False) -> tuple[str, StepResult | None]:
    """The step's key, and its recorded result if it is fresh (None when it must run). A round starts with its
    query: that is when its pool is frozen (`Campaign.freeze_pool`)."""
    if step is QUERY:
        campaign.freeze_pool(round_id)
    key = step_key(campaign, step, round_id)
    if is_history(campaign, step, round_id) and not force and not is_fresh(campaign, step, round_id, key):
        raise StepInputError(f"round {round_id}'s queries are history (its job was exported) but "
                             f"{step.outputs(campaign, round_id)['queries']} is missing or changed: restore it "
                             "(`dvc checkout`), it is never recomputed")
    if force or not is_fresh(campaign, step, round_id, key):
        return key, None
    record = read_record(campaign, step, round_id)
    return key, StepResult(step.name, round_id, True, record["outputs"], record["seconds"], record.get("details", {}))


def record_step(campaign: Campaign, step: Step, round_id: int, key: str, measured: dict[str, Any]) -> StepResult:
    """After a step ran: record its key, the md5 of each output and what it measured (in a distributed training
    run, process 0 alone writes, as it alone writes the outputs)."""
    if not is_main_process():
        return StepResult(step.name, round_id, False, {}, measured.get("seconds", {}), measured.get("details", {}))
    digests = {name: file_md5(path) for name, path in step.outputs(campaign, round_id).items()}
    record = {"step": step.name, "round": round_id, "key": key, "outputs": digests, "code": code_version(),
              "seconds": measured.get("seconds", {}), "details": measured.get("details", {})}
    write_json(record, campaign.files(round_id).step_record(step.name))
    return StepResult(step.name, round_id, False, digests, record["seconds"], record["details"])


def run_step(campaign: Campaign, step: Step, round_id: int, *, progress: bool = False,
             force: bool = False, runtime: Runtime | None = None) -> StepResult:
    """Run one step of one round, unless it is fresh (or `force`); record what it made. `runtime`: where and how
    to run it, when not as the campaign's settings say (one process of a distributed group)."""
    key, done = begin_step(campaign, step, round_id, force=force)
    if done is not None:
        return done
    log.info("round %d: %s", round_id, step.name)
    measured = step.run(step.prepare(campaign, round_id, runtime or Runtime(progress=progress)))
    return record_step(campaign, step, round_id, key, measured)


# ------------------------------------------------------------------------------------------ finished rounds


def round_keys(campaign: Campaign, round_id: int) -> dict[str, str] | None:
    """The key of each step of the round when every step is fresh; None when any has work to do."""
    keys = {}
    for step in round_steps(campaign):
        try:
            key = step_key(campaign, step, round_id)
        except StepInputError:  # an input is missing: an earlier step or round has not run
            return None
        if not is_fresh(campaign, step, round_id, key):
            return None
        keys[step.name] = key
    return keys


def mark_finished(campaign: Campaign, round_id: int, **details: Any) -> None:
    """Record that the round is done, as every step's record says, and kept elsewhere (versioned, registered:
    `details`). A later run compares the round against this instead of asking DVC or MLflow."""
    keys = round_keys(campaign, round_id)
    record = {"round": round_id, "keys": keys, **details}
    path = campaign.files(round_id).finished
    if keys is not None and (not path.is_file() or json.loads(path.read_text()) != json.loads(json.dumps(record))):
        write_json(record, path)  # an unchanged record is left alone: a finished round's files keep their times


def finished_round(campaign: Campaign, round_id: int) -> dict[str, Any] | None:
    """The round's finish record while nothing it was made from has changed since (settings, data, code inputs,
    outputs); None when the round has work to do."""
    try:
        record = json.loads(campaign.files(round_id).finished.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if record.get("keys") == round_keys(campaign, round_id) else None


def nothing_to_do(campaign: Campaign) -> str:
    """What a run of a finished, unchanged campaign says instead of running."""
    return (f"campaign {campaign.name}: rounds 0-{campaign.settings.campaign.rounds} are done and nothing they were "
            "made from has changed; nothing to do (raise campaign.rounds for more)")


def pending_rounds(campaign: Campaign) -> list[int]:
    """The rounds of a simulated campaign that still have work to do (to run, version or register)."""
    return [r for r in range(campaign.settings.campaign.rounds + 1) if finished_round(campaign, r) is None]


# ----------------------------------------------------------------------------------------------- the plain loop


def run_round(campaign: Campaign, round_id: int, *, progress: bool = False,
              steps: Sequence[Step] | None = None) -> list[StepResult]:
    """Every step of one round (the recipe's, or `steps`: the benchmark's dense reference), in order, in this
    process. A human round stops with StepInputError until its batch has been collected."""
    steps = round_steps(campaign) if steps is None else steps
    return [run_step(campaign, step, round_id, progress=progress) for step in steps]


def run_campaign(campaign: Campaign, *, progress: bool = False,
                 on_round: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Round 0 (random pixels), then `campaign.rounds` rounds, in plain Python; returns each round's metrics."""
    results = []
    for round_id in range(campaign.settings.campaign.rounds + 1):
        run_round(campaign, round_id, progress=progress)
        metrics = read_metrics(campaign.files(round_id).metrics)
        results.append(metrics)
        write_progress(campaign)
        if on_round is not None:
            on_round(round_id, metrics)
    return results
