"""The steps of a round, each a function of its `StepInput` (`pixelpick.step_input`) alone.

    query     round 0: k random pixels per image; later rounds: the previous model's probabilities over the pool
              (into the round's probability store), then PixelPick's selection           -> queries.parquet
    annotate  the simulated annotator: each queried pixel's ground-truth class           -> annotations.parquet
    ingest    the previous snapshot plus this round's batch, validated whole              -> labels.parquet
              (these two are `pixelpick.labelling`'s: they need no torch, so their DVC stages start quickly)
    train     a model on the snapshot                                                      -> model.pt
    evaluate  mIoU on the evaluation split (or the label statistics alone, without masks)  -> metrics.json

Each step reads the input files of its StepInput, and only the settings it declares, writes its outputs
atomically, and returns a dict of what it measured (seconds per part, and details). Which files and settings each
step depends on is declared once, in `pixelpick.recipe`; every way of running a round prepares its StepInput from
that declaration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pixelpick.acquisition import balance_scores, class_weights, random_pixels, select_pixels
from pixelpick.campaign import round_seed
from pixelpick.checkpoints import label_space_record, load_previous, read_checkpoint, save_checkpoint
from pixelpick.digests import file_md5, value_digest
from pixelpick.distributed import is_main_process, launch, rank_and_size
from pixelpick.errors import StepInputError
from pixelpick.expansion import Expander
from pixelpick.inference import InferenceTimings, infer_to_store, pool_batches, predict_batches
from pixelpick.io import write_json, write_parquet
from pixelpick.labels import read_labels
from pixelpick.models import subnormals_flushed
from pixelpick.pools import stale_labels
from pixelpick.probstore import ProbabilityStore, create_store, mark_complete, remove_store, store_bytes
from pixelpick.step_input import StepInput
from pixelpick.superpixels import SuperpixelCache, SuperpixelParams
from pixelpick.training import ResumePoint, fit, predict_pseudo_labels
from pixelpick.training import evaluate as evaluate_model

log = logging.getLogger(__name__)

QUERY_COLUMNS = ["image_id", "y", "x", "score", "round"]



# --------------------------------------------------------------------------------------------------------- query


@dataclass(frozen=True)
class QueryPlan:
    """How a round's query is split: the shards (each a run of the pool's inference batches: see
    `inference.pool_batches`), the store they write to (None when no model is needed: round 0 and random picks),
    whether that store is already complete and current (then shards only select), and the class weights of
    class-balanced selection, which depend on every label so far."""

    shards: list[list[tuple[int, list[str]]]]
    store: str | None = None
    reuse: bool = False
    model: str | None = None
    weights: list[float] | None = None


@subnormals_flushed()
def query(step: StepInput) -> dict[str, Any]:
    """Choose the round's pixels: k per image, never one already labelled (nor, in simulation, void). In one
    process: the plan's single shard, then the merge (a cluster runs the same three functions, shards in
    parallel)."""
    plan, labelled = plan_query(step)
    frame, seconds = query_shard(step, plan, 0, labelled[0])
    return finish_query(step, plan, [frame], [seconds])


def plan_query(step: StepInput, shards: int = 1) -> tuple[QueryPlan, list[dict[str, np.ndarray]]]:
    """Split the round's query into `shards` runs of whole inference batches and create (or reuse) the store.
    Returns the plan and, for each shard, the labelled (y, x) of its images: what its selection must not ask again.
    The previous snapshot is read once, for those and for the class weights."""
    settings = step.settings
    previous_model, previous_snapshot = step.inputs.get("previous_model"), step.inputs.get("previous_snapshot")
    labels = read_labels(previous_snapshot) if previous_snapshot is not None else None
    batches = pool_batches(step.pool, settings.train.eval_batch_size)
    count = max(1, min(shards, len(batches)))
    split = [batches[i * len(batches) // count:(i + 1) * len(batches) // count] for i in range(count)]
    labelled = _labelled_by_shard(labels, split)
    if previous_model is None or settings.acquire.strategy == "random":
        return QueryPlan(split), labelled
    location = step.scratch["probability_store"]
    key = value_digest({"model": file_md5(previous_model), "strategy": settings.acquire.strategy,
                        "mc_samples": settings.acquire.mc_samples,
                        "seed": round_seed(settings.campaign.seed, step.round_id)})
    reuse = False
    try:
        store = ProbabilityStore(location)
        # A class appended since the store was made: its probabilities have a channel fewer than the label space.
        classes = step.pool.label_space.num_classes
        current = store.key == key and store.checksummed() and store.num_classes == classes
        damaged = store.damaged_images() if current else None
        reuse = damaged == []
        if damaged:
            log.warning("probability store %s: the chunks of %d image(s) are missing or damaged (e.g. %r): "
                        "recomputing the store", location, len(damaged), damaged[0])
        elif not reuse:
            log.info("probability store %s is stale or was written without checksums: recomputing it", location)
    except (FileNotFoundError, RuntimeError):
        pass
    if not reuse:
        create_store(location, step.image_sizes, step.pool.label_space.num_classes,
                     settings.acquire.strategy, key=key)
    weights = None
    if settings.acquire.class_balance > 0:
        weights = _class_weights(step, labels, settings.acquire.class_balance).tolist()
    return QueryPlan(split, str(location), reuse, str(previous_model), weights), labelled


def _labelled_by_shard(labels: pd.DataFrame | None,
                       shards: list[list[tuple[int, list[str]]]]) -> list[dict[str, np.ndarray]]:
    if labels is None:
        return [{} for _ in shards]
    by_image = {image_id: group[["y", "x"]].to_numpy() for image_id, group in labels.groupby("image_id", sort=False)}
    return [{image_id: by_image[image_id] for _, ids in shard for image_id in ids if image_id in by_image}
            for shard in shards]


def query_shard(step: StepInput, plan: QueryPlan, index: int,
                labelled: dict[str, np.ndarray]) -> tuple[pd.DataFrame, dict[str, float]]:
    """One shard: its images' probabilities and scores into the store (unless reused), then their picks. It reads
    only the dataset, the model and the store, so it can run on any machine that reaches those three."""
    settings, shard = step.settings, plan.shards[index]
    image_ids = [image_id for _, ids in shard for image_id in ids]
    seconds = {"inference": 0.0, "scoring": 0.0}
    store = None
    if plan.store is not None:
        if not plan.reuse:
            timings = InferenceTimings()
            infer_to_store(step.load_model(Path(plan.model)), step.pool, plan.store, step.device,
                           strategy=settings.acquire.strategy, mc_samples=settings.acquire.mc_samples,
                           seed=round_seed(settings.campaign.seed, step.round_id), timings=timings, batches=shard)
            seconds = {"inference": timings.seconds, "scoring": timings.scoring_seconds}
        store = ProbabilityStore(plan.store, require_complete=False)
    started = time.perf_counter()
    weights = np.asarray(plan.weights) if plan.weights is not None else None
    frame = select(step, image_ids, labelled, store, weights)
    seconds["selection"] = time.perf_counter() - started
    return frame, seconds


def finish_query(step: StepInput, plan: QueryPlan, frames: list[pd.DataFrame],
                 seconds: list[dict[str, float]]) -> dict[str, Any]:
    """Merge the shards' picks in pool order, mark the store complete, write the queries."""
    if plan.store is not None and not plan.reuse:
        mark_complete(plan.store)
    position = {image_id: i for i, image_id in enumerate(step.pool.image_ids)}
    queries = pd.concat(frames, ignore_index=True)
    queries = queries.iloc[np.argsort(queries["image_id"].map(position).to_numpy(), kind="stable")]
    write_parquet(queries.reset_index(drop=True), step.outputs["queries"])
    total = {part: sum(s.get(part, 0.0) for s in seconds) for part in ("inference", "scoring", "selection")}
    details = {"shards": len(frames), "queried_pixels": len(queries),
               "store_bytes": store_bytes(plan.store) if plan.store else 0,
               "stores_removed": remove_old_stores(step)}
    log.info("round %d: probability store %.1f MB", step.round_id, details["store_bytes"] / 1e6)
    return {"seconds": total, "details": details}


def remove_old_stores(step: StepInput) -> list[int]:
    """Keep the stores of the newest `campaign.keep_stores` rounds up to the step's (all when None): once a round
    has selected, older rounds' stores are only a cache of their models' predictions. Returns the rounds removed."""
    keep = step.settings.campaign.keep_stores
    if keep is None:
        return []
    return [r for r in range(step.round_id - keep + 1) if remove_store(step.scratch[f"probability_store_{r}"])]


def select(step: StepInput, image_ids: Iterable[str], labelled: dict[str, np.ndarray],
           store: ProbabilityStore | None, weights: np.ndarray | None = None) -> pd.DataFrame:
    """The round's queries for `image_ids`: from the store's scores (class-balanced with `weights`), or uniformly
    at random without a store; never a pixel in `labelled` (image id -> (n, 2) labelled (y, x)).

    Every image draws from its own generator (seeded by the campaign, the round and the image's position in the
    pool), so any subset of images, in any order or process, picks exactly what the whole pool picks.
    """
    settings, round_id = step.settings, step.round_id
    acquire = settings.acquire
    k = settings.campaign.initial_pixels_per_image if round_id == 0 else acquire.pixels_per_image
    position = {image_id: index for index, image_id in enumerate(step.pool.image_ids)}
    frames = []
    for image_id in image_ids:
        seed = round_seed(settings.campaign.seed, round_id) * 1_000_003 + position[image_id]
        generator = torch.Generator().manual_seed(seed)
        exclude = _excluded(step, image_id, labelled.get(image_id))
        if store is None:
            pixels = random_pixels(exclude.shape, k=k, exclude=exclude, generator=generator)
            scores = np.full(len(pixels), np.nan)
        else:
            score_map = store.scores(image_id)
            if weights is not None and store is not None:
                score_map = balance_scores(score_map, store.probs(image_id), weights)
            pixels = select_pixels(score_map, k=k, exclude=exclude, top_fraction=acquire.top_fraction,
                                   min_distance=acquire.min_distance, generator=generator)
            scores = score_map[pixels[:, 0], pixels[:, 1]]
        frames.append(pd.DataFrame({"image_id": image_id, "y": pixels[:, 0].astype(np.int32),
                                    "x": pixels[:, 1].astype(np.int32), "score": np.asarray(scores, np.float32),
                                    "round": np.int32(round_id)}, columns=QUERY_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def _excluded(step: StepInput, image_id: str, labelled: np.ndarray | None) -> np.ndarray:
    """Pixels never to query: those already labelled (void answers included) and, in simulation, void ground
    truth. People's rounds never read the masks."""
    excluded = np.zeros(step.image_sizes[image_id], dtype=bool)
    if labelled is not None:
        excluded[labelled[:, 0], labelled[:, 1]] = True
    if step.simulated and step.settings.acquire.exclude_void and step.pool.has_masks:
        excluded |= step.pool.load_mask(image_id) == step.pool.label_space.ignore_index
    return excluded


def _class_weights(step: StepInput, labels: pd.DataFrame | None, power: float) -> np.ndarray:
    space = step.pool.label_space
    classes = np.zeros(0, np.int64) if labels is None else labels["class_id"].to_numpy()
    counts = np.bincount(classes[classes != space.ignore_index], minlength=space.num_classes)
    return class_weights(counts, power)


# --------------------------------------------------------------------------------------------------------- train


@subnormals_flushed()
def train(step: StepInput) -> dict[str, Any]:
    """Train the round's model on its snapshot: re-initialised (or, with `train.warm_start`, from the previous
    round's model) for `train.epochs` epochs (`train.initial_epochs` in round 0), with the configured
    superpixel expansion and self-training. No `snapshot` input trains on every pixel's ground truth instead (the
    fully supervised reference). With `train.processes` > 1, as that many DDP processes (`distributed.launch`).
    """
    settings, train_settings, round_id = step.settings, step.settings.train, step.round_id
    snapshot, previous_model = step.inputs.get("snapshot"), step.inputs.get("previous_model")
    if train_settings.processes > 1 and rank_and_size()[1] == 1 and snapshot is not None:
        return launch(step, train_settings.processes)
    seed = round_seed(settings.campaign.seed, round_id)
    torch.manual_seed(seed)
    model = step.new_model()
    if previous_model is not None and train_settings.warm_start:  # round 0 has none, and reads no warm_start
        load_previous(model, read_checkpoint(previous_model), previous_model)  # grows it if classes were appended
    labels = read_labels(snapshot) if snapshot is not None else None
    stale, manifest = 0, step.manifest
    if labels is not None:  # labels of photos changed or removed since they were labelled leave training
        if manifest is None:
            raise StepInputError(f"train of round {round_id} needs the round's frozen pool "
                                 f"{step.inputs['pool']}, which does not exist: the round starts with its query, "
                                 "which freezes it")
        dropped = stale_labels(labels, manifest)
        labels, stale = labels[~dropped].reset_index(drop=True), int(dropped.sum())
    epochs = train_settings.initial_epochs if round_id == 0 and train_settings.initial_epochs else train_settings.epochs
    superpixels = None
    if train_settings.superpixels and labels is not None:
        params = SuperpixelParams(train_settings.superpixels, train_settings.superpixel_compactness)
        superpixels = SuperpixelCache(step.pool, params, settings.data.cache_dir,
                                      dict(zip(manifest["image_id"], manifest["md5"])))
    pseudo = None
    if previous_model is not None and labels is not None and train_settings.self_training_threshold:
        teacher = step.load_model(previous_model)
        pseudo = predict_pseudo_labels(teacher, step.pool, sorted(set(labels["image_id"])), labels,
                                       train_settings.self_training_threshold, step.device,
                                       train_settings.eval_batch_size)
    expander = _expander(step) if labels is not None else None
    # A resume point for exactly this training: the same inputs and recipe settings, or it is ignored. Runtime
    # settings are not in it: a training killed on one device or with another `checkpoint_every` continues.
    pretrained = settings.model.pretrained_path
    key = value_digest({"snapshot": file_md5(snapshot) if snapshot else None, "epochs": epochs, "seed": seed,
                        "previous": file_md5(previous_model) if previous_model else None,
                        "pretrained": file_md5(pretrained) if pretrained else None,
                        "settings": step.keyed_values()})
    resume = ResumePoint(Path(step.scratch["training_state"]), key, every=train_settings.checkpoint_every)
    started = time.perf_counter()
    result = fit(model, step.pool, labels, train_settings.replaced(epochs=epochs), step.device,
                 seed=seed, superpixels=superpixels, pseudo_labels=pseudo, resume=resume,
                 progress=step.runtime.progress, expander=expander)
    seconds = time.perf_counter() - started
    space = step.pool.label_space
    if not is_main_process():
        return {}
    save_checkpoint(step.outputs["model"], model, arch=settings.model.arch, num_classes=space.num_classes,
                    dropout_p=settings.model.dropout_p, label_space=label_space_record(space),
                    image_size=list(settings.data.image_size) if settings.data.image_size else None,
                    round=round_id, snapshot_md5=file_md5(snapshot) if snapshot is not None else None,
                    settings=dict(step.provenance), history=result.history)
    return {"seconds": {"training": seconds},
            "details": {"epochs": epochs, "seconds_per_epoch": result.seconds_per_epoch, "stale_labels_left_out": stale,
                        "resumed_after_epoch": result.resumed_from_epoch, "device": str(step.device),
                        **result.expansion}}


def _expander(step: StepInput) -> Expander | None:
    """What sieves and propagates clicks (from the previous model) and measures every expansion against the ground
    truth of a simulated campaign; None when the settings expand nothing. Round 0 has no previous model: it only
    expands over superpixels, and reads no sieve or propagation setting."""
    t = step.settings.train
    previous_model = step.inputs.get("previous_model")
    later = step.round_id > 0 and previous_model is not None
    sieve = t.superpixel_sieve if later else 0.0
    threshold = t.propagation_threshold if later else 0.0
    if not (t.superpixels or threshold):
        return None
    teacher = None
    if sieve or threshold:
        model, pool, device = step.load_model(previous_model), step.pool, step.device

        def teacher(image_id: str) -> np.ndarray:
            return next(predict_batches(model, pool, [image_id], device, batch_size=1))[1][0].numpy()

    truth = step.pool.load_mask if step.simulated and step.pool.has_masks else None
    return Expander(step.pool.label_space.ignore_index, teacher=teacher, sieve=sieve,
                    propagation_threshold=threshold, propagation_radius=t.propagation_radius if threshold else 0,
                    propagation_weight=t.propagation_weight if threshold else 1.0, truth=truth)


# ------------------------------------------------------------------------------------------------------ evaluate


@subnormals_flushed()
def evaluate(step: StepInput) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy on the evaluation images that have masks, with the round's label
    statistics (no `snapshot` input: every non-void pixel of the pool, for the fully supervised reference).
    Without any evaluation mask, the metrics say so and hold only the label statistics."""
    started = time.perf_counter()
    round_id, pool, snapshot = step.round_id, step.pool, step.inputs.get("snapshot")
    space = pool.label_space
    if snapshot is not None:
        classes = read_labels(snapshot)["class_id"].to_numpy()
        asked = len(classes)
    else:
        classes = np.concatenate([pool.load_mask(i).ravel() for i in pool.image_ids])
        asked = int((classes != space.ignore_index).sum())
    metrics: dict[str, Any] = {
        "round": round_id,
        "labelled_pixels": int((classes != space.ignore_index).sum()),
        # Labelled so far, over all rounds; each round after round 0 asks `acquire.pixels_per_image` more.
        "labelled_per_image": asked / len(pool),
        "labels_per_class": {c.name: int((classes == i).sum()) for i, c in enumerate(space.classes)},
        "class_names": list(space.names),
    }
    eval_set = step.eval_set
    with_masks = [] if eval_set is None else [i for i in eval_set.image_ids if eval_set.has_mask(i)]
    if with_masks:
        measured = evaluate_model(step.load_model(step.inputs["model"]), eval_set, step.device,
                                  step.settings.train.eval_batch_size, step.runtime.progress, image_ids=with_masks)
        metrics.update({key: measured[key] for key in ("miou", "iou_per_class", "pixel_accuracy",
                                                        "mean_class_accuracy")})
        metrics["evaluated_images"] = len(with_masks)
    else:
        why = ("no evaluation split is set (data.eval_split)" if eval_set is None
               else f"split {eval_set.split!r} has no masks")
        metrics.update(miou=None, iou_per_class=None, evaluated_images=0, not_measured=f"mIoU not measured: {why}")
    write_json(json_safe(metrics), step.outputs["metrics"])
    return {"seconds": {"evaluation": time.perf_counter() - started}}


def json_safe(value: Any) -> Any:
    """NaN IoU (a class absent from ground truth and prediction) becomes null in JSON."""
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value
