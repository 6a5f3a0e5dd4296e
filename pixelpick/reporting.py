"""What a round and a campaign report: query statistics, a picture of the picks, and mIoU against labelled pixels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pixelpick.campaign import Campaign
from pixelpick.io import atomic_write, write_csv
from pixelpick.labels import read_labels
from pixelpick.probstore import ProbabilityStore
from pixelpick.visualise import progress_plot, query_panel

# `labelled_per_image`: labelled pixels per pool image so far (cumulative), not `acquire.pixels_per_image`, the
# budget of one round.
PROGRESS_COLUMNS = ["round", "labelled_pixels", "labelled_per_image", "miou"]


def read_metrics(path: Path) -> dict[str, Any]:
    """A round's metrics file. Files written before the cumulative count was renamed called it `pixels_per_image`,
    the name of the per-round budget; they read as the new ones."""
    metrics = json.loads(Path(path).read_text())
    if "pixels_per_image" in metrics and "labelled_per_image" not in metrics:
        metrics["labelled_per_image"] = metrics.pop("pixels_per_image")
    return metrics


def query_statistics(campaign: Campaign, round_id: int) -> dict[str, Any]:
    """This round's picks only: label histogram, mean score of the picks, spatial coverage (mean distance of each
    image's picks from their centroid, in pixels) and distinct classes per image."""
    files = campaign.files(round_id)
    queries = pd.read_parquet(files.queries)
    labels = read_labels(files.snapshot)
    labels = labels[labels["round"] == round_id]
    names = [c.name for c in campaign.pool.label_space.classes] + ["void"]
    classes = labels["class_id"].clip(upper=len(names) - 1)
    histogram = {names[c]: int(n) for c, n in classes.value_counts().sort_index().items()}
    centred = queries[["y", "x"]] - queries.groupby("image_id")[["y", "x"]].transform("mean")
    return {
        "label_histogram": histogram,
        "mean_score": float(queries["score"].mean()) if queries["score"].notna().any() else float("nan"),
        "spatial_coverage": float(np.hypot(centred["y"], centred["x"]).mean()),
        "queried_pixels": len(queries),
        "distinct_classes_per_image": float(labels.groupby("image_id")["class_id"].nunique().mean()),
    }


def query_figure(campaign: Campaign, round_id: int, num_images: int = 3) -> bytes:
    """PNG of the first images' picks, beside their score maps when the round kept its probability store."""
    files = campaign.files(round_id)
    queries = pd.read_parquet(files.queries)
    image_ids = list(dict.fromkeys(queries["image_id"]))[:num_images]
    try:
        store = ProbabilityStore(campaign.probability_store(round_id))
    except (FileNotFoundError, RuntimeError):
        store = None  # round 0, the random strategy, or a store removed after selection
    return query_panel(
        images=[campaign.pool.load_image(i) for i in image_ids],
        picks=[queries.loc[queries["image_id"] == i, ["y", "x"]].to_numpy() for i in image_ids],
        scores=[store.scores(i) if store else None for i in image_ids],
        titles=[f"{i} (round {round_id})" for i in image_ids],
    )


def progress_rows(campaign: Campaign) -> list[dict[str, Any]]:
    """One row per evaluated round: round, labelled pixels, labelled pixels per image, mIoU (None when not
    measured)."""
    rows = []
    for round_id in campaign.layout.rounds_present():
        path = campaign.files(round_id).metrics
        if path.is_file():
            metrics = read_metrics(path)
            rows.append({key: metrics.get(key) for key in PROGRESS_COLUMNS})
    return rows


def write_progress(campaign: Campaign) -> tuple[Path, Path]:
    """The campaign's progress table and plot (what `dvc plots show` draws); the same rounds give the same bytes."""
    rows = progress_rows(campaign)
    layout = campaign.layout
    write_csv(pd.DataFrame(rows, columns=PROGRESS_COLUMNS), layout.progress_table)
    png = progress_plot(rows, f"campaign {campaign.name}")
    atomic_write(layout.progress_plot, lambda f: f.write(png))
    return layout.progress_table, layout.progress_plot
