"""The steps of a round, as functions with explicit inputs and outputs.

    query     round 0: k random pixels per image; later rounds: the previous model's probabilities over the pool
              (into the round's probability store), then PixelPick's selection           -> queries.parquet
    annotate  the simulated annotator: each queried pixel's ground-truth class           -> annotations.parquet
    ingest    the previous snapshot plus this round's batch, validated whole              -> labels.parquet
    train     a model on the snapshot                                                      -> model.pt
    evaluate  mIoU on the evaluation split (or the label statistics alone, without masks)  -> metrics.json

Each step reads the files it is given and writes its output atomically, and returns a dict of what it measured
(seconds per part, and details). Which files and settings each step depends on is declared once, in
`pixelpick.recipe`; every way of running a round goes through that declaration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pixelpick.acquisition import balance_scores, class_weights, random_pixels, select_pixels
from pixelpick.annotator import simulate_annotations
from pixelpick.campaign import Campaign, round_seed
from pixelpick.checkpoints import label_space_record, read_checkpoint, save_checkpoint
from pixelpick.digests import file_md5, value_digest
from pixelpick.errors import PixelPickError
from pixelpick.inference import InferenceTimings, infer_to_store
from pixelpick.io import write_json, write_parquet
from pixelpick.labels import LabelStore, read_labels
from pixelpick.probstore import ProbabilityStore
from pixelpick.superpixels import SuperpixelCache, SuperpixelParams
from pixelpick.training import evaluate as evaluate_model
from pixelpick.training import fit, predict_pseudo_labels

log = logging.getLogger(__name__)

QUERY_COLUMNS = ["image_id", "y", "x", "score", "round"]


class StepInputError(PixelPickError):
    """A step was given input it cannot use (an empty label batch, say); the message names the file."""


# --------------------------------------------------------------------------------------------------------- query


def query(campaign: Campaign, round_id: int, *, previous_model: Path | None, previous_snapshot: Path | None,
          out: Path) -> dict[str, Any]:
    """Choose the round's pixels: k per image, never one already labelled (nor, in simulation, void)."""
    acquire = campaign.settings.acquire
    labels = read_labels(previous_snapshot) if previous_snapshot is not None else None
    seconds: dict[str, float] = {}
    store = None
    if previous_model is not None and acquire.strategy != "random":
        store, seconds = infer(campaign, round_id, previous_model)
    started = time.perf_counter()
    queries = select(campaign, round_id, campaign.pool.image_ids, labels, store)
    seconds["selection"] = time.perf_counter() - started
    write_parquet(queries, out)
    return {"seconds": seconds, "queried_pixels": len(queries)}


def infer(campaign: Campaign, round_id: int, model_path: Path) -> tuple[ProbabilityStore, dict[str, float]]:
    """The previous model's probabilities and scores over the pool in the round's store. A complete store computed
    from the same model and settings, with every chunk on disk, is reused; anything else is recomputed."""
    settings, path = campaign.settings, campaign.files(round_id).probs
    key = value_digest({"model": file_md5(model_path), "strategy": settings.acquire.strategy,
                        "mc_samples": settings.acquire.mc_samples,
                        "seed": round_seed(settings.campaign.seed, round_id)})
    try:
        store = ProbabilityStore(path)
        if store.key == key and not store.missing_images():
            return store, {"inference": 0.0, "scoring": 0.0}
        log.info("probability store %s is stale or has missing chunks: recomputing it", path)
    except (FileNotFoundError, RuntimeError):
        pass
    timings = InferenceTimings()
    infer_to_store(campaign.load_model(model_path), campaign.pool, path, campaign.device,
                   strategy=settings.acquire.strategy, mc_samples=settings.acquire.mc_samples,
                   batch_size=settings.train.eval_batch_size, seed=round_seed(settings.campaign.seed, round_id),
                   key=key, timings=timings)
    return ProbabilityStore(path), {"inference": timings.seconds, "scoring": timings.scoring_seconds}


def select(campaign: Campaign, round_id: int, image_ids: Iterable[str], labels: pd.DataFrame | None,
           store: ProbabilityStore | None) -> pd.DataFrame:
    """The round's queries for `image_ids`: from the store's scores, or uniformly at random without one.

    Every image draws from its own generator (seeded by the campaign, the round and the image's position in the
    pool), so any subset of images, in any order or process, picks exactly what the whole pool picks.
    """
    settings = campaign.settings
    acquire = settings.acquire
    k = settings.campaign.initial_pixels_per_image if round_id == 0 else acquire.pixels_per_image
    labelled = {} if labels is None else {
        image_id: rows[["y", "x"]].to_numpy() for image_id, rows in labels.groupby("image_id", sort=False)}
    weights = None
    if store is not None and acquire.class_balance > 0:
        weights = _class_weights(campaign, labels, acquire.class_balance)
    position = {image_id: index for index, image_id in enumerate(campaign.pool.image_ids)}
    frames = []
    for image_id in image_ids:
        seed = round_seed(settings.campaign.seed, round_id) * 1_000_003 + position[image_id]
        generator = torch.Generator().manual_seed(seed)
        exclude = _excluded(campaign, image_id, labelled.get(image_id))
        if store is None:
            pixels = random_pixels(exclude.shape, k=k, exclude=exclude, generator=generator)
            scores = np.full(len(pixels), np.nan)
        else:
            score_map = store.scores(image_id)
            if weights is not None:
                score_map = balance_scores(score_map, store.probs(image_id), weights)
            pixels = select_pixels(score_map, k=k, exclude=exclude, top_fraction=acquire.top_fraction,
                                   min_distance=acquire.min_distance, generator=generator)
            scores = score_map[pixels[:, 0], pixels[:, 1]]
        frames.append(pd.DataFrame({"image_id": image_id, "y": pixels[:, 0].astype(np.int32),
                                    "x": pixels[:, 1].astype(np.int32), "score": np.asarray(scores, np.float32),
                                    "round": np.int32(round_id)}, columns=QUERY_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def _excluded(campaign: Campaign, image_id: str, labelled: np.ndarray | None) -> np.ndarray:
    """Pixels never to query: those already labelled (void answers included) and, in simulation, void ground
    truth. People's rounds never read the masks."""
    excluded = np.zeros(campaign.image_sizes[image_id], dtype=bool)
    if labelled is not None:
        excluded[labelled[:, 0], labelled[:, 1]] = True
    if campaign.simulated and campaign.settings.acquire.exclude_void and campaign.pool.has_masks:
        excluded |= campaign.pool.load_mask(image_id) == campaign.pool.label_space.ignore_index
    return excluded


def _class_weights(campaign: Campaign, labels: pd.DataFrame | None, power: float) -> np.ndarray:
    space = campaign.pool.label_space
    classes = np.zeros(0, np.int64) if labels is None else labels["class_id"].to_numpy()
    counts = np.bincount(classes[classes != space.ignore_index], minlength=space.num_classes)
    return class_weights(counts, power)


# ------------------------------------------------------------------------------------------------------ annotate


def annotate(campaign: Campaign, round_id: int, *, queries: Path, out: Path) -> dict[str, Any]:
    """Label the queries from the ground truth, with the configured error rate: the simulated annotator."""
    started = time.perf_counter()
    asked = pd.read_parquet(queries)
    space = campaign.pool.label_space
    annotations = simulate_annotations(
        asked[["image_id", "y", "x"]], campaign.pool.load_mask, num_classes=space.num_classes,
        ignore_index=space.ignore_index, round_id=round_id, error_rate=campaign.settings.campaign.error_rate,
        generator=np.random.default_rng(round_seed(campaign.settings.campaign.seed, round_id)))
    if round_id == 0:
        annotations["source"] = "initial-random"
    write_parquet(annotations, out)
    return {"seconds": {"labelling": time.perf_counter() - started}}


# -------------------------------------------------------------------------------------------------------- ingest


def ingest(campaign: Campaign, round_id: int, *, batch: Path, previous_snapshot: Path | None,
           out: Path) -> dict[str, Any]:
    """The round's snapshot: the previous snapshot plus `batch`, validated whole. Nothing is written unless every
    row is valid, so a rejected batch leaves no snapshot behind, and re-running gives the same file."""
    started = time.perf_counter()
    labels = read_labels(batch)
    if labels.empty:
        raise StepInputError(f"label batch {batch} holds no labels: nothing to add to round {round_id}")
    staging = out.with_name(f".{out.name}.ingest")
    staging.unlink(missing_ok=True)
    try:
        if previous_snapshot is not None:
            write_parquet(read_labels(previous_snapshot), staging)
        space = campaign.pool.label_space
        store = LabelStore(staging, image_sizes=campaign.image_sizes, num_classes=space.num_classes,
                           ignore_index=space.ignore_index)
        result = store.append(labels)
        staging.replace(out)
    finally:
        staging.unlink(missing_ok=True)
    return {"seconds": {"labelling": time.perf_counter() - started}, "added": result.added}


# --------------------------------------------------------------------------------------------------------- train


def train(campaign: Campaign, round_id: int, *, snapshot: Path | None, previous_model: Path | None,
          out: Path, progress: bool = False) -> dict[str, Any]:
    """Train the round's model on its snapshot: re-initialised (or, with `train.warm_start`, from the previous
    round's model) for `train.epochs` epochs (`train.initial_epochs` in round 0), with the configured
    superpixel expansion and self-training. `snapshot` None trains on every pixel's ground truth instead (the
    fully supervised reference)."""
    settings, train_settings = campaign.settings, campaign.settings.train
    seed = round_seed(settings.campaign.seed, round_id)
    torch.manual_seed(seed)
    model = campaign.new_model()
    if train_settings.warm_start and previous_model is not None:
        model.load_state_dict(read_checkpoint(previous_model)["model"])
    labels = read_labels(snapshot) if snapshot is not None else None
    epochs = train_settings.initial_epochs if round_id == 0 and train_settings.initial_epochs else train_settings.epochs
    superpixels = None
    if train_settings.superpixels and labels is not None:
        params = SuperpixelParams(train_settings.superpixels, train_settings.superpixel_compactness)
        superpixels = SuperpixelCache(campaign.pool, params, settings.data.cache_dir)
    pseudo = None
    if train_settings.self_training_threshold and previous_model is not None and labels is not None:
        teacher = campaign.load_model(previous_model)
        pseudo = predict_pseudo_labels(teacher, campaign.pool, sorted(set(labels["image_id"])), labels,
                                       train_settings.self_training_threshold, campaign.device,
                                       train_settings.eval_batch_size)
    started = time.perf_counter()
    result = fit(model, campaign.pool, labels, train_settings.model_copy(update={"epochs": epochs}), campaign.device,
                 seed=seed, superpixels=superpixels, pseudo_labels=pseudo, progress=progress)
    seconds = time.perf_counter() - started
    space = campaign.pool.label_space
    save_checkpoint(out, model, arch=settings.model.arch, num_classes=space.num_classes,
                    dropout_p=settings.model.dropout_p, label_space=label_space_record(space),
                    image_size=list(settings.data.image_size) if settings.data.image_size else None,
                    round=round_id, snapshot_md5=file_md5(snapshot) if snapshot is not None else None,
                    settings=campaign.recorded_settings(),
                    history=result.history)
    return {"seconds": {"training": seconds},
            "details": {"epochs": epochs, "seconds_per_epoch": result.seconds_per_epoch,
                        "device": str(campaign.device)}}


# ------------------------------------------------------------------------------------------------------ evaluate


def evaluate(campaign: Campaign, round_id: int, *, model: Path, snapshot: Path | None, out: Path,
             progress: bool = False) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy on the evaluation images that have masks, with the round's label
    statistics (`snapshot` None: every non-void pixel of the pool, for the fully supervised reference). Without
    any evaluation mask, the metrics say so and hold only the label statistics."""
    started = time.perf_counter()
    space = campaign.pool.label_space
    if snapshot is not None:
        classes = read_labels(snapshot)["class_id"].to_numpy()
        asked = len(classes)
    else:
        classes = np.concatenate([campaign.pool.load_mask(i).ravel() for i in campaign.pool.image_ids])
        asked = int((classes != space.ignore_index).sum())
    metrics: dict[str, Any] = {
        "round": round_id,
        "labelled_pixels": int((classes != space.ignore_index).sum()),
        "pixels_per_image": asked / len(campaign.pool),
        "labels_per_class": {c.name: int((classes == i).sum()) for i, c in enumerate(space.classes)},
        "class_names": list(space.names),
    }
    eval_set = campaign.eval_set
    with_masks = [] if eval_set is None else [i for i in eval_set.image_ids if eval_set.has_mask(i)]
    if with_masks:
        measured = evaluate_model(campaign.load_model(model), eval_set, campaign.device,
                                  campaign.settings.train.eval_batch_size, progress, image_ids=with_masks)
        metrics.update({key: measured[key] for key in ("miou", "iou_per_class", "pixel_accuracy",
                                                        "mean_class_accuracy")})
        metrics["evaluated_images"] = len(with_masks)
    else:
        why = ("no evaluation split is set (data.eval_split)" if eval_set is None
               else f"split {eval_set.split!r} has no masks")
        metrics.update(miou=None, iou_per_class=None, evaluated_images=0, not_measured=f"mIoU not measured: {why}")
    write_json(json_safe(metrics), out)
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
