"""The labelling steps of a round: `annotate` (the simulated annotator) and `ingest` (the round's batch added to the
label snapshot). They need neither torch nor a model, so the DVC stage that runs one does not wait seconds for
importing them; the other steps are `pixelpick.steps`'.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from pixelpick.annotation.exchange import predicted_classes
from pixelpick.annotator import simulate_annotations
from pixelpick.campaign import round_seed
from pixelpick.errors import StepInputError
from pixelpick.io import write_parquet
from pixelpick.labels import LabelStore, check_batch_for_round, read_labels
from pixelpick.step_input import StepInput

# ------------------------------------------------------------------------------------------------------ annotate


def annotate(step: StepInput) -> dict[str, Any]:
    """Label the queries from the ground truth, with the configured error rate: the simulated annotator."""
    started = time.perf_counter()
    round_id, settings = step.round_id, step.settings.campaign
    asked = pd.read_parquet(step.inputs["queries"])
    space = step.pool.label_space
    trust = settings.suggestion_trust if round_id > 0 else 0.0  # round 0 has no model to suggest
    annotations = simulate_annotations(
        asked[["image_id", "y", "x"]], step.pool.load_mask, num_classes=space.num_classes,
        ignore_index=space.ignore_index, round_id=round_id, error_rate=settings.error_rate,
        generator=np.random.default_rng(round_seed(settings.seed, round_id)),
        suggestions=_suggested_classes(step, asked) if trust else None,
        suggestion_trust=trust)
    if round_id == 0:
        annotations["source"] = "initial-random"
    write_parquet(annotations, step.outputs["annotations"])
    return {"seconds": {"labelling": time.perf_counter() - started}}


def _suggested_classes(step: StepInput, queries: pd.DataFrame) -> np.ndarray:
    """The previous model's class at each query (from the round's probability store), -1 where it has none: what
    the annotator page would suggest."""
    pixels = {image_id: list(zip(rows["y"].astype(int), rows["x"].astype(int), strict=True))
              for image_id, rows in queries.groupby("image_id", sort=False)}
    predicted = predicted_classes(step.scratch["probability_store"], pixels)
    keys = zip(queries["image_id"], queries["y"].astype(int), queries["x"].astype(int), strict=True)
    return np.array([predicted.get(key, (-1, 0.0))[0] for key in keys], dtype=np.int64)


# -------------------------------------------------------------------------------------------------------- ingest


def ingest(step: StepInput) -> dict[str, Any]:
    """The round's snapshot: the previous snapshot plus the round's `batch`, validated whole: exact types, this
    round's `round`, only pixels the round queried (`queries`), classes of the dataset. Nothing is written unless
    every row is valid, so a rejected batch leaves no snapshot behind, and re-running gives the same file."""
    started = time.perf_counter()
    round_id, batch, out = step.round_id, step.inputs["batch"], step.outputs["snapshot"]
    previous_snapshot = step.inputs.get("previous_snapshot")
    labels = read_labels(batch)
    if labels.empty:
        raise StepInputError(f"label batch {batch} holds no labels: nothing to add to round {round_id}")
    check_batch_for_round(labels, round_id=round_id, queried=pd.read_parquet(step.inputs["queries"]), source=batch)
    staging = out.with_name(f".{out.name}.ingest")
    staging.unlink(missing_ok=True)
    try:
        if previous_snapshot is not None:
            write_parquet(read_labels(previous_snapshot), staging)
        space = step.pool.label_space
        store = LabelStore(staging, image_sizes=step.image_sizes, num_classes=space.num_classes,
                           ignore_index=space.ignore_index)
        result = store.append(labels)
        staging.replace(out)
    finally:
        staging.unlink(missing_ok=True)
    return {"seconds": {"labelling": time.perf_counter() - started}, "added": result.added}
