"""A PixelPick campaign in plain Python: initial random pixels, then rounds of infer, select, label, train, evaluate.

Every step reads and writes files under `<workdir>/<campaign>/rounds/rNN/` (layout in docs/architecture.md), so the
same steps run here in a loop, as Prefect tasks, and as DVC stages. Round r is: choose pixels (at random for r = 0,
otherwise with round r-1's model), label them, snapshot the labels, train round r's model on that snapshot, and
evaluate it. Each step is deterministic for a seed, and every write is atomic, so a crashed round re-runs to the
same result.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pixelpick.acquisition import balance_scores, class_weights, random_pixels, select_pixels
from pixelpick.annotator import simulate_annotations
from pixelpick.datasets import get_dataset
from pixelpick.datasets.base import SegmentationDataset
from pixelpick.inference import InferenceTimings, infer_to_store
from pixelpick.io import atomic_write, write_csv, write_json, write_parquet
from pixelpick.labels import LABEL_SCHEMA, AppendResult, LabelStore, read_labels
from pixelpick.models import build_model
from pixelpick.probstore import ProbabilityStore
from pixelpick.settings import Settings
from pixelpick.training import evaluate, fit, resolve_device
from pixelpick.visualise import query_panel

log = logging.getLogger(__name__)

QUERY_COLUMNS = ["image_id", "y", "x", "score", "round"]


@dataclass(frozen=True)
class RoundPaths:
    """Where one round's files live."""

    dir: Path

    @property
    def probs(self) -> Path:
        return self.dir / "probs.zarr"

    @property
    def queries(self) -> Path:
        return self.dir / "queries.parquet"

    @property
    def annotations(self) -> Path:
        return self.dir / "annotations.parquet"

    @property
    def snapshot(self) -> Path:
        return self.dir / "labels.parquet"

    @property
    def model(self) -> Path:
        return self.dir / "model.pt"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def train_log(self) -> Path:
        return self.dir / "train_log.json"

    @property
    def infer_log(self) -> Path:
        return self.dir / "infer_log.json"

    @property
    def job(self) -> Path:
        return self.dir / "job.json"


def round_seed(seed: int, round_id: int) -> int:
    """One seed per (campaign, round), so any round can be re-run on its own with the same randomness."""
    return seed * 10_007 + round_id


class Campaign:
    """The state of one campaign on disk, and the steps of a round. Cheap to construct: datasets load lazily."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = settings.campaign.run_dir

    # ---------------------------------------------------------------- state

    @cached_property
    def pool(self) -> SegmentationDataset:
        return get_dataset(self.settings.data, self.settings.data.train_split)

    @cached_property
    def eval_set(self) -> SegmentationDataset:
        return get_dataset(self.settings.data, self.settings.data.eval_split)

    @cached_property
    def image_sizes(self) -> dict[str, tuple[int, int]]:
        return {image_id: self.pool.image_size(image_id) for image_id in self.pool.image_ids}

    def label_store(self, round_id: int) -> LabelStore:
        """The label table as of `round_id`: its file is that round's snapshot."""
        space = self.pool.label_space
        return LabelStore(
            self.paths(round_id).snapshot,
            image_sizes=self.image_sizes,
            num_classes=space.num_classes,
            ignore_index=space.ignore_index,
        )

    def labels_before(self, round_id: int) -> pd.DataFrame:
        """Every label made before `round_id` (empty for round 0)."""
        if round_id == 0:
            return LABEL_SCHEMA.empty_table().to_pandas()
        return read_labels(self.paths(round_id - 1).snapshot)

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.settings.train.device)

    def paths(self, round_id: int) -> RoundPaths:
        return RoundPaths(self.run_dir / "rounds" / f"r{round_id:02d}")

    # ---------------------------------------------------------------- steps

    def infer(self, round_id: int, progress: bool = False) -> Path:
        """Probabilities and scores of round `round_id - 1`'s model over the pool, into round `round_id`'s store.

        Its timings (wall seconds, seconds spent scoring and writing, images) go to the round's infer_log.json.
        """
        if round_id == 0:
            raise ValueError("round 0 picks its pixels at random: there is no model to infer with")
        acquire = self.settings.acquire
        model = self.load_model(self.paths(round_id - 1).model)
        timings = InferenceTimings()
        store = infer_to_store(
            model,
            self.pool,
            self.paths(round_id).probs,
            self.device,
            strategy=acquire.strategy,
            mc_samples=acquire.mc_samples,
            batch_size=self.settings.train.eval_batch_size,
            seed=round_seed(self.settings.campaign.seed, round_id),
            progress=progress,
            timings=timings,
        )
        log = {"seconds": timings.seconds, "scoring_seconds": timings.scoring_seconds,
               "write_seconds": timings.write_seconds, "images": timings.images}
        write_json(log, self.paths(round_id).infer_log)
        return store

    def select(self, round_id: int) -> Path:
        """Choose this round's pixels: k per image, never one already labelled (or void, in simulation)."""
        acquire = self.settings.acquire
        generator = torch.Generator().manual_seed(round_seed(self.settings.campaign.seed, round_id))
        labels = self.labels_before(round_id)
        labelled = {image_id: rows[["y", "x"]].to_numpy() for image_id, rows in labels.groupby("image_id", sort=False)}
        frames = []
        if round_id == 0:
            k = self.settings.campaign.initial_pixels_per_image
            for image_id in self.pool.image_ids:
                exclude = self._excluded(image_id, labelled.get(image_id))
                pixels = random_pixels(exclude.shape, k=k, exclude=exclude, generator=generator)
                frames.append(_queries(image_id, pixels, np.full(len(pixels), np.nan), round_id))
        else:
            store = ProbabilityStore(self.paths(round_id).probs)
            weights = self._class_weights(labels) if acquire.class_balance > 0 else None
            for image_id, scores in store.iter_scores():
                if weights is not None:
                    scores = balance_scores(scores, store.probs(image_id), weights)
                pixels = select_pixels(
                    scores,
                    k=acquire.pixels_per_image,
                    exclude=self._excluded(image_id, labelled.get(image_id)),
                    top_fraction=acquire.top_fraction,
                    min_distance=acquire.min_distance,
                    generator=generator,
                )
                frames.append(_queries(image_id, pixels, scores[pixels[:, 0], pixels[:, 1]], round_id))
        queries = pd.concat(frames, ignore_index=True)
        return write_parquet(queries, self.paths(round_id).queries)

    def export_job(self, round_id: int) -> Path:
        """The round's annotation job for human annotators (format in docs/annotation.md)."""
        from pixelpick.annotation.jobs import export_job

        queries = pd.read_parquet(self.paths(round_id).queries)
        name = self.settings.campaign.name
        return export_job(queries, self.pool, job_id=f"{name}-r{round_id:02d}", campaign=name,
                          round_id=round_id, path=self.paths(round_id).job, dataset_name=self.settings.data.dataset)

    def human_batch(self, round_id: int) -> Path:
        """Where a round's human labels land as a batch file (tracked by DVC as an input)."""
        return self.settings.campaign.labels_dir / self.settings.campaign.name / f"r{round_id:02d}.parquet"

    def collect_human_labels(self, round_id: int) -> Path:
        """The finished annotation job's labels, validated against the job, as the round's batch file.

        Raises AnnotationJobError while the job is unfinished.
        """
        from pixelpick.annotation.progress import default_progress_path, ingest_job_labels

        job = self.paths(round_id).job
        return ingest_job_labels(job, default_progress_path(job), self.human_batch(round_id))

    def annotate_simulated(self, round_id: int) -> Path:
        """Label this round's queries from the ground truth (with the configured error rate)."""
        queries = pd.read_parquet(self.paths(round_id).queries)
        space = self.pool.label_space
        annotations = simulate_annotations(
            queries[["image_id", "y", "x"]],
            self.pool.load_mask,
            num_classes=space.num_classes,
            ignore_index=space.ignore_index,
            round_id=round_id,
            error_rate=self.settings.campaign.error_rate,
            generator=np.random.default_rng(round_seed(self.settings.campaign.seed, round_id)),
        )
        if round_id == 0:
            annotations["source"] = "initial-random"
        return write_parquet(annotations, self.paths(round_id).annotations)

    def ingest(self, round_id: int, batch_path: Path) -> AppendResult:
        """Append a batch of labels (simulated or human) to round `round_id`'s table, all or nothing.

        The round's table starts as a copy of the previous round's snapshot, so snapshot r is exactly
        snapshot r-1 plus round r's batch, and re-ingesting the same batch after a crash adds nothing.
        """
        store = self.label_store(round_id)
        if not store.path.exists():
            write_parquet(self.labels_before(round_id), store.path)
        return store.append(read_labels(batch_path))

    def train(self, round_id: int, progress: bool = False, dense: bool = False) -> Path:
        """Train round `round_id`'s model on its label snapshot; re-initialised unless `train.warm_start`.

        `dense` trains on every pixel's ground truth instead (the full-supervision reference): no snapshot needed.
        """
        paths = self.paths(round_id)
        seed = round_seed(self.settings.campaign.seed, round_id)
        torch.manual_seed(seed)
        model = self.new_model()
        if self.settings.train.warm_start and round_id > 0:
            model.load_state_dict(self.read_checkpoint(self.paths(round_id - 1).model)["model"])
        labels = None if dense else read_labels(paths.snapshot)
        train_settings = self.settings.train.model_copy(update={"seed": seed})
        result = fit(model, self.pool, labels, train_settings, self.device, progress=progress)
        checkpoint = {
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "arch": self.settings.model.arch,
            "num_classes": self.pool.label_space.num_classes,
            "round": round_id,
            "history": result.history,
        }
        # Saved through a buffer: torch names the archive after the file it writes, and the temporary file's
        # random name would make two identical trainings differ byte for byte. Timings stay out for the same
        # reason; they go to train_log.json.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(paths.model, lambda f: f.write(buffer.getvalue()))
        write_json({"seconds_per_epoch": result.seconds_per_epoch, "epochs": len(result.history),
                    "device": str(self.device)}, paths.train_log)
        return paths.model

    def evaluate(self, round_id: int, progress: bool = False) -> dict[str, Any]:
        """Evaluate round `round_id`'s model on the evaluation split and write metrics.json."""
        paths = self.paths(round_id)
        model = self.load_model(paths.model)
        metrics = evaluate(model, self.eval_set, self.device, self.settings.train.eval_batch_size, progress)
        labels = read_labels(paths.snapshot)
        metrics.update(
            round=round_id,
            labelled_pixels=int((labels["class_id"] != self.pool.label_space.ignore_index).sum()),
            pixels_per_image=len(labels) / len(self.pool),
        )
        write_json(json_safe(metrics), paths.metrics)
        return metrics

    def run_round(self, round_id: int, progress: bool = False) -> dict[str, Any]:
        """One whole round with the simulated annotator."""
        if round_id > 0:
            self.infer(round_id, progress)
        self.select(round_id)
        self.ingest(round_id, self.annotate_simulated(round_id))
        self.train(round_id, progress)
        return self.evaluate(round_id, progress)

    def run(self, progress: bool = False) -> list[dict[str, Any]]:
        return [self.run_round(r, progress) for r in range(self.settings.campaign.rounds + 1)]

    def write_progress(self) -> Path:
        """mIoU against labelled pixels, one row per finished round (the plot `dvc plots show` draws)."""
        rows = []
        for round_dir in sorted((self.run_dir / "rounds").glob("r*")):
            metrics_path = RoundPaths(round_dir).metrics
            if metrics_path.exists():
                m = json.loads(metrics_path.read_text())
                rows.append({key: m[key] for key in ("round", "labelled_pixels", "pixels_per_image", "miou")})
        return write_csv(pd.DataFrame(rows, columns=["round", "labelled_pixels", "pixels_per_image", "miou"]),
                         self.run_dir / "progress.csv")

    def query_statistics(self, round_id: int) -> dict[str, Any]:
        """This round's picks only (the reference accumulated across rounds): label histogram, mean score of
        the picks, and spatial coverage (mean distance of each image's picks from their centroid, in pixels)."""
        queries = pd.read_parquet(self.paths(round_id).queries)
        labels = read_labels(self.paths(round_id).snapshot)
        labels = labels[labels["round"] == round_id]
        names = [c.name for c in self.pool.label_space.classes] + ["void"]
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

    def query_figure(self, round_id: int, num_images: int = 3) -> bytes:
        """PNG of the first images' picks and score maps for this round."""
        queries = pd.read_parquet(self.paths(round_id).queries)
        image_ids = list(dict.fromkeys(queries["image_id"]))[:num_images]
        store = ProbabilityStore(self.paths(round_id).probs) if round_id > 0 else None
        return query_panel(
            images=[self.pool.load_image(i) for i in image_ids],
            picks=[queries.loc[queries["image_id"] == i, ["y", "x"]].to_numpy() for i in image_ids],
            scores=[store.scores(i) if store else None for i in image_ids],
            titles=[f"{i} (round {round_id})" for i in image_ids],
        )

    # ---------------------------------------------------------------- helpers

    def new_model(self) -> torch.nn.Module:
        m = self.settings.model
        return build_model(
            m.arch, self.pool.label_space.num_classes, pretrained_path=m.pretrained_path, dropout_p=m.dropout_p
        )

    def load_model(self, path: Path) -> torch.nn.Module:
        model = self.new_model()
        model.load_state_dict(self.read_checkpoint(path)["model"])
        return model.to(self.device).eval()

    @staticmethod
    def read_checkpoint(path: Path) -> dict:
        if not path.exists():
            raise FileNotFoundError(f"no model at {path}: train that round first")
        return torch.load(path, map_location="cpu", weights_only=True)

    def _class_weights(self, labels: pd.DataFrame) -> np.ndarray:
        space = self.pool.label_space
        classes = labels["class_id"].to_numpy()
        counts = np.bincount(classes[classes != space.ignore_index], minlength=space.num_classes)
        return class_weights(counts, self.settings.acquire.class_balance)

    def _excluded(self, image_id: str, labelled: np.ndarray | None) -> np.ndarray:
        """Pixels never to query: those already labelled (void answers included) and, in simulation, void GT."""
        excluded = np.zeros(self.image_sizes[image_id], dtype=bool)
        if labelled is not None:
            excluded[labelled[:, 0], labelled[:, 1]] = True
        if self.settings.acquire.exclude_void and self.pool.has_masks:
            excluded |= self.pool.load_mask(image_id) == self.pool.label_space.ignore_index
        return excluded


def _queries(image_id: str, pixels: np.ndarray, scores: np.ndarray, round_id: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": image_id,
            "y": pixels[:, 0].astype(np.int32),
            "x": pixels[:, 1].astype(np.int32),
            "score": np.asarray(scores, dtype=np.float32),
            "round": np.int32(round_id),
        },
        columns=QUERY_COLUMNS,
    )


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
