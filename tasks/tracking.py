"""MLflow at the edge: a parent run per campaign, a nested run per round, a registered model version per round.

Each round's version is a pyfunc model (tasks/serving.py) with a signature and an input example, carrying the
round's checkpoint, so `mlflow.pyfunc.load_model("models:/<name>@best")` predicts and `mlflow models serve` serves
it. Lineage tags on the run and the version give the label snapshot's md5, the model's md5, the git commit and
the version whose predictions chose the round's pixels.

Logging is idempotent: a round's run is found by its tags (campaign, round, model md5) before one is created, and
a version by its run, so re-running a round, or a crash between two calls, never makes a second run or version.
MLflow's active run is thread-local and Prefect runs tasks on worker threads, so run ids are passed explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from pixelpick.campaign import Campaign
from pixelpick.digests import file_md5
from pixelpick.provenance import code_version
from pixelpick.recipe import STEPS, read_record, round_steps
from pixelpick.reporting import query_statistics
from pixelpick.settings import flatten

REPO = Path(__file__).resolve().parents[1]
SERVING_CODE = Path(__file__).with_name("serving.py")
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI opens it on runs, not GenAI traces


def registered_model_name(campaign_name: str) -> str:
    return f"pixelpick-{campaign_name}"


def git_commit() -> str:
    return code_version()["commit"] or "unknown"


def experiment_id_for(client: MlflowClient, name: str) -> str:
    """The id of the experiment `name`, created on first use (its artifacts beside a local tracking database)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        uri = mlflow.get_tracking_uri()
        location = None  # a tracking server manages its own artifact root
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        elif not uri.startswith(("http://", "https://", "databricks")):  # a database reached directly
            location = (REPO / "data" / "mlartifacts").as_uri()
        try:
            experiment_id = client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            experiment_id = client.get_experiment_by_name(name).experiment_id
    else:
        experiment_id = experiment.experiment_id
    client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    return experiment_id


def _find_run(client: MlflowClient, experiment_id: str, **tags: str):
    query = " and ".join(f"tags.`pixelpick.{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time"])
    return runs[0] if runs else None


# ------------------------------------------------------------------------------------------------- the campaign


def campaign_run(campaign: Campaign) -> str:
    """The campaign's parent run, created on first use and marked RUNNING while the campaign runs (the caller
    marks it finished: `end_campaign_run`)."""
    client = MlflowClient()
    run_id = _parent_run(client, campaign)
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    return run_id


def _parent_run(client: MlflowClient, campaign: Campaign) -> str:
    """The campaign's parent run, created (and left FINISHED) on first use; its status is not touched otherwise,
    so a round logged outside a campaign run (by `dvc repro`) leaves no run RUNNING."""
    experiment_id = experiment_id_for(client, campaign.name)
    run = _find_run(client, experiment_id, kind="campaign", campaign=campaign.name)
    if run is not None:
        return run.info.run_id
    run = client.create_run(experiment_id, run_name=campaign.name, tags={
        "pixelpick.kind": "campaign", "pixelpick.campaign": campaign.name, "mlflow.source.git.commit": git_commit()})
    for key, value in flatten(campaign.recorded_settings()).items():
        client.log_param(run.info.run_id, key, value[:6000])
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def end_campaign_run(campaign: Campaign, status: str) -> None:
    """Mark the campaign's parent run FINISHED, FAILED or KILLED."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(campaign.name)
    run = experiment and _find_run(client, experiment.experiment_id, kind="campaign", campaign=campaign.name)
    if run:
        client.set_terminated(run.info.run_id, status=status)


# ---------------------------------------------------------------------------------------------------- a round


def log_round(campaign: Campaign, round_id: int) -> str:
    """Log the round (params, per-epoch curves, mIoU, per-class IoU, query statistics), register its model as a
    pyfunc with lineage tags, and move the `round-NN` and `best` aliases. Returns the registered version.
    A transient failure (a busy SQLite file, a restarting server) is retried by the calling task's Prefect retries."""
    files = campaign.files(round_id)
    client = MlflowClient()
    parent_id = _parent_run(client, campaign)
    experiment_id = client.get_run(parent_id).info.experiment_id
    model_name = registered_model_name(campaign.name)
    model_md5 = file_md5(files.model)
    # The round's run (and version) is the one whose model is the file there now: a model restored to an earlier
    # one finds that one's version again, and the aliases move back to it.
    run = _find_run(client, experiment_id, kind="round", campaign=campaign.name, round=str(round_id), model=model_md5)
    if run is not None and run.data.tags.get("pixelpick.model_version"):
        version = run.data.tags["pixelpick.model_version"]
        _move_aliases(client, model_name, version, round_id)
        return version

    metrics = json.loads(files.metrics.read_text())
    previous = _version_of_round(client, model_name, round_id - 1) if round_id > 0 else None
    lineage = {
        "pixelpick.kind": "round", "pixelpick.campaign": campaign.name, "pixelpick.round": str(round_id),
        "pixelpick.model": model_md5, "pixelpick.snapshot_md5": file_md5(files.snapshot),
        "pixelpick.queries_from_model_version": previous or "random",
        "mlflow.parentRunId": parent_id, "mlflow.source.git.commit": git_commit(),
    }
    if run is None:
        run = client.create_run(experiment_id, run_name=f"round-{round_id:02d}", tags=lineage)
        _log_round_data(client, run.info.run_id, campaign, round_id, metrics)
    run_id = run.info.run_id
    version = _registered_version(client, model_name, run_id) or _register(campaign, round_id, run_id, model_name,
                                                                             lineage)
    client.set_tag(run_id, "pixelpick.model_version", version)
    client.set_terminated(run_id)
    _move_aliases(client, model_name, version, round_id)
    return version


def _log_round_data(client: MlflowClient, run_id: str, campaign: Campaign, round_id: int, metrics: dict) -> None:
    from pixelpick.checkpoints import read_checkpoint

    # The settings the round's steps read, as their keys hold them: round 0 logs the `train.initial_epochs` it
    # trained and no `train.epochs`, and no acquisition settings (its queries are random).
    used = {key: value for step in round_steps(campaign)
            for key, value in step.prepare(campaign, round_id).keyed_values().items()}
    for key, value in {"round": round_id, **used, "labelled_pixels": metrics["labelled_pixels"]}.items():
        client.log_param(run_id, key, value)
    for epoch in read_checkpoint(campaign.files(round_id).model)["history"]:
        for key in ("loss", "lr_head"):
            client.log_metric(run_id, f"train_{key}", epoch[key], step=epoch["epoch"])
    client.log_metric(run_id, "labelled_pixels", metrics["labelled_pixels"], step=round_id)
    trained = (read_record(campaign, STEPS["train"], round_id) or {}).get("details", {})
    if "stale_labels_left_out" in trained:  # labels of photos changed or removed since they were labelled
        client.log_metric(run_id, "stale_labels_left_out", trained["stale_labels_left_out"], step=round_id)
    if metrics.get("miou") is not None:
        client.log_metric(run_id, "miou", metrics["miou"], step=round_id)
        client.log_metric(run_id, "pixel_accuracy", metrics["pixel_accuracy"], step=round_id)
        for name, iou in zip(metrics["class_names"], metrics["iou_per_class"]):
            if iou is not None:
                client.log_metric(run_id, f"iou_{name.replace(' ', '_')}", iou, step=round_id)
    else:
        client.set_tag(run_id, "pixelpick.miou", metrics.get("not_measured", "not measured"))
    for key, value in query_statistics(campaign, round_id).items():
        if isinstance(value, dict):
            client.log_dict(run_id, value, f"query_stats/{key}.json")
        elif not np.isnan(value):
            client.log_metric(run_id, f"query_{key}", value, step=round_id)
    client.log_artifact(run_id, str(campaign.files(round_id).metrics))
    labelling = campaign.files(round_id).labelling  # a human round's: seconds per label, suggestions accepted
    if labelling.is_file():
        for key, value in json.loads(labelling.read_text()).items():
            if isinstance(value, int | float):
                client.log_metric(run_id, f"labelling_{key}", value, step=round_id)
        client.log_artifact(run_id, str(labelling))


def model_signature(num_classes: int) -> ModelSignature:
    """uint8 RGB images in, class probabilities and label maps out, any batch and image size; the `output`
    parameter asks for less (labels only, or probabilities as float16 or uint8: tasks/serving.py)."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes, -1, -1), "probabilities"),
                        TensorSpec(np.dtype(np.int64), (-1, -1, -1), "labels")]),
        params=ParamSchema([ParamSpec("output", "string", "all")]),
    )


def _register(campaign: Campaign, round_id: int, run_id: str, model_name: str, lineage: dict[str, str]) -> str:
    """Log the round's checkpoint as a pyfunc model in its run and register it as a new version."""
    import torch
    import torchvision

    import pixelpick

    files = campaign.files(round_id)
    image = campaign.pool.load_image(campaign.pool.image_ids[0])
    tags = {k.removeprefix("pixelpick."): v for k, v in lineage.items() if k.startswith("pixelpick.")}
    tags["git_commit"] = lineage["mlflow.source.git.commit"]
    # The code that trained this model (its step record), not the code logging it.
    trained_by = (read_record(campaign, STEPS["train"], round_id) or {}).get("code") or code_version()
    tags.update({"code_version": str(trained_by["version"]), "code_digest": str(trained_by["digest"]),
                 "code_commit": str(trained_by["commit"]), "code_dirty": str(trained_by["dirty"])})
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="segmenter",
            python_model=str(SERVING_CODE),
            artifacts={"checkpoint": str(files.model)},
            code_paths=[str(Path(pixelpick.__file__).parent)],
            signature=model_signature(campaign.pool.label_space.num_classes),
            input_example=image[None],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"torchvision=={torchvision.__version__.split('+')[0]}",
                              f"numpy=={np.__version__}", "pillow", "scikit-image", "pandas", "pyarrow", "pyyaml",
                              "pydantic", "zarr", "tqdm", "filelock", "matplotlib"],
            registered_model_name=model_name,
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    return version


def _registered_version(client: MlflowClient, model_name: str, run_id: str) -> str | None:
    """The version a crashed earlier attempt already registered from this run, if any."""
    try:
        versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return max((str(v.version) for v in versions), key=int, default=None)


def _version_of_round(client: MlflowClient, model_name: str, round_id: int) -> str | None:
    try:
        return client.get_model_version_by_alias(model_name, f"round-{round_id:02d}").version
    except MlflowException:
        return None


def _move_aliases(client: MlflowClient, model_name: str, version: str, round_id: int) -> None:
    """`round-NN` names the version of the round's model as it is now; `best` is the version with the highest
    measured mIoU among those (the earliest of equals), so it follows the files: a round whose model is replaced,
    or restored, takes `best` with it or gives it back, and a round that was not evaluated never takes it (MLflow
    reserves `latest`: `models:/<name>/latest` already resolves to the newest version)."""
    client.set_registered_model_alias(model_name, f"round-{round_id:02d}", version)
    aliases = client.get_registered_model(model_name).aliases
    current = {str(v) for name, v in dict(aliases).items() if name.startswith("round-")}
    measured = []
    for candidate in current:
        run_id = client.get_model_version(model_name, candidate).run_id
        miou = client.get_run(run_id).data.metrics.get("miou") if run_id else None
        if miou is not None and np.isfinite(miou):
            measured.append((miou, -int(candidate)))
    if not measured:
        return
    best = str(-max(measured)[1])
    try:
        if str(client.get_model_version_by_alias(model_name, "best").version) == best:
            return
    except MlflowException:  # no best yet
        pass
    client.set_registered_model_alias(model_name, "best", best)
