"""MLflow at the edge: a parent run per campaign, a nested run per round, a registered model version per round.

MLflow's active run is thread-local and Prefect runs tasks on worker threads (stack-notes §4.1), so run ids are
passed explicitly and every call goes through `MlflowClient`. Both tasks are idempotent: a re-run round finds its
earlier run by tags instead of logging a second one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from prefect import task

from pixelpick.settings import flatten
from tasks.common import file_md5, open_campaign


def registered_model_name(campaign_name: str) -> str:
    return f"pixelpick-{campaign_name}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _find_run(client: MlflowClient, experiment_id: str, **tags: str):
    query = " and ".join(f"tags.`pixelpick.{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0] if runs else None


def experiment_id_for(client: MlflowClient, name: str) -> str:
    """The id of the experiment `name`, created on first use."""
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    # Artifacts go beside the tracking database, not into whatever directory the flow happens to run in.
    artifacts = Path(__file__).resolve().parents[1] / "data" / "mlartifacts"
    return client.create_experiment(name, artifact_location=artifacts.as_uri())


@task(retries=2, retry_delay_seconds=5)
def start_campaign_run(settings_json: str) -> str:
    """The campaign's parent run (reused when the campaign is run again with the same settings)."""
    campaign = open_campaign(settings_json)
    name = campaign.settings.campaign.name
    client = MlflowClient()
    experiment_id = experiment_id_for(client, name)
    settings_md5 = text_md5(settings_json)
    existing = _find_run(client, experiment_id, kind="campaign", settings=settings_md5)
    if existing:
        return existing.info.run_id
    run = client.create_run(experiment_id, run_name=name,
                            tags={"pixelpick.kind": "campaign", "pixelpick.settings": settings_md5,
                                  "mlflow.source.git.commit": git_commit()})
    for key, value in flatten(json.loads(settings_json)).items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


@task(retries=2, retry_delay_seconds=5)
def log_round(settings_json: str, round_id: int, parent_run_id: str, model_digest: str) -> str:
    """Log the round (params, per-epoch curves, mIoU, per-class IoU, query statistics), register its model with
    lineage tags, move the `round-NN` and `best` aliases. Returns the registered model version."""
    campaign = open_campaign(settings_json)
    paths = campaign.paths(round_id)
    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    model_name = registered_model_name(campaign.settings.campaign.name)
    done = _find_run(client, experiment_id, kind="round", round=str(round_id), model=model_digest)
    if done and done.data.tags.get("pixelpick.model_version"):
        return done.data.tags["pixelpick.model_version"]

    metrics = json.loads(paths.metrics.read_text())
    checkpoint = campaign.read_checkpoint(paths.model)
    snapshot_md5 = file_md5(paths.snapshot)
    previous_version = _version_of_round(client, model_name, round_id - 1) if round_id > 0 else None
    lineage = {
        "pixelpick.kind": "round",
        "pixelpick.round": str(round_id),
        "pixelpick.model": model_digest,
        "pixelpick.snapshot_md5": snapshot_md5,
        "pixelpick.queries_from_model_version": previous_version or "random",
        "mlflow.parentRunId": parent_run_id,
        "mlflow.source.git.commit": git_commit(),
    }
    run = client.create_run(experiment_id, run_name=f"round-{round_id:02d}", tags=lineage)
    run_id = run.info.run_id
    settings = campaign.settings
    for key, value in {
        "round": round_id, "strategy": settings.acquire.strategy, "pixels_per_image": settings.acquire.pixels_per_image,
        "top_fraction": settings.acquire.top_fraction, "arch": settings.model.arch, "epochs": settings.train.epochs,
        "warm_start": settings.train.warm_start, "labelled_pixels": metrics["labelled_pixels"],
    }.items():
        client.log_param(run_id, key, value)
    for epoch_metrics in checkpoint["history"]:
        for key in ("loss", "lr_head"):
            client.log_metric(run_id, f"train_{key}", epoch_metrics[key], step=epoch_metrics["epoch"])
    client.log_metric(run_id, "miou", metrics["miou"], step=round_id)
    client.log_metric(run_id, "pixel_accuracy", metrics["pixel_accuracy"], step=round_id)
    client.log_metric(run_id, "labelled_pixels", metrics["labelled_pixels"], step=round_id)
    for name, iou in zip(metrics["class_names"], metrics["iou_per_class"]):
        if iou is not None:
            client.log_metric(run_id, f"iou_{name.replace(' ', '_')}", iou, step=round_id)
    for key, value in campaign.query_statistics(round_id).items():
        if isinstance(value, dict):
            client.log_dict(run_id, value, f"query_stats/{key}.json")
        else:
            client.log_metric(run_id, f"query_{key}", value, step=round_id)
    client.log_artifact(run_id, str(paths.metrics))

    version = _register(run_id, experiment_id, model_name, paths.model, lineage)
    client.set_tag(run_id, "pixelpick.model_version", version)
    client.set_terminated(run_id)
    _move_aliases(client, model_name, version, round_id, metrics["miou"])
    return version


def _register(run_id: str, experiment_id: str, model_name: str, checkpoint: Path, lineage: dict[str, str]) -> str:
    """Log the round's checkpoint as an MLflow LoggedModel (a state dict: no pickled code) and register it as a
    new version of the campaign's model, with the lineage as tags on both."""
    client = MlflowClient()
    tags = {k.removeprefix("pixelpick."): v for k, v in lineage.items() if k.startswith("pixelpick.")}
    tags["git_commit"] = lineage["mlflow.source.git.commit"]
    logged = mlflow.initialize_logged_model(
        name="segmenter", source_run_id=run_id, tags=tags, model_type="pixelpick-checkpoint",
        experiment_id=experiment_id,
    )
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(checkpoint, Path(folder) / checkpoint.name)
        client.log_model_artifacts(logged.model_id, folder)
    mlflow.finalize_logged_model(logged.model_id, "READY")
    if not client.search_registered_models(f"name = '{model_name}'"):
        client.create_registered_model(model_name, description="PixelPick segmentation models, one version per round")
    version = client.create_model_version(
        model_name, source=f"models:/{logged.model_id}", run_id=run_id, tags=tags, model_id=logged.model_id
    )
    return str(version.version)


def _version_of_round(client: MlflowClient, model_name: str, round_id: int) -> str | None:
    versions = client.search_model_versions(f"name = '{model_name}' and tags.round = '{round_id}'")
    return max((str(v.version) for v in versions), key=int, default=None)


def _move_aliases(client: MlflowClient, model_name: str, version: str, round_id: int, miou: float) -> None:
    """`round-NN` names each round's version and `best` follows the highest mIoU. (MLflow reserves `latest`:
    `models:/<name>/latest` already resolves to the newest version.)"""
    client.set_registered_model_alias(model_name, f"round-{round_id:02d}", version)
    try:
        best = client.get_model_version_by_alias(model_name, "best")
        best_miou = client.get_run(best.run_id).data.metrics.get("miou", -np.inf)
    except mlflow.exceptions.MlflowException:
        best_miou = -np.inf
    if miou >= best_miou:
        client.set_registered_model_alias(model_name, "best", version)


def text_md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()
