"""Opening, holding and closing a campaign at the edge: its record and pipeline file, its lock, its MLflow run."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import task
from prefect.exceptions import TerminationSignal

from pixelpick.campaign import Campaign, open_campaign
from pixelpick.errors import CampaignError
from pixelpick.locking import campaign_lock, holds
from pixelpick.recipe import finished_round, mark_finished, nothing_to_do, pending_rounds, round_steps
from pixelpick.reporting import read_metrics, write_progress
from tasks.artifacts import publish_round_artifacts
from tasks.pipeline_files import write_pipeline
from tasks.servers import crash_abandoned_flow_runs
from tasks.steps import open_for_task
from tasks.tracking import campaign_run, end_campaign_run, log_round
from tasks.versioning import version_round

log = logging.getLogger(__name__)


@task(task_run_name="open-campaign")
def start_campaign(params: str, overrides: dict[str, Any], annotator: str = "simulated") -> dict[str, Any]:
    """Open (or start) the campaign: its settings recorded on first use or checked against the record (refused,
    naming the keys, when they differ), its pipeline file written. The flow calling this needs the campaign's
    labels to come from `annotator`. Returns the campaign's folder, name, rounds and round steps. Flow runs a
    killed process left running are marked Crashed first."""
    try:
        crash_abandoned_flow_runs()
    except Exception as error:  # someone else's records: never a reason to fail this run
        log.warning("could not check for flow runs left running by a killed process: %s", error)
    campaign = open_campaign(params, overrides)
    if campaign.settings.campaign.annotator != annotator:
        command = "pixelpick human query/train" if annotator == "simulated" else "pixelpick campaign/round"
        raise CampaignError(f"campaign {campaign.name!r} is labelled by campaign.annotator = "
                            f"{campaign.settings.campaign.annotator!r}: run its rounds with `{command}`")
    write_pipeline(campaign)
    return {"dir": str(campaign.layout.dir), "name": campaign.name, "rounds": campaign.settings.campaign.rounds,
            "steps": [step.name for step in round_steps(campaign)]}


@contextmanager
def hold_campaign(campaign_dir: str) -> Iterator[None]:
    """For the duration of a flow: the campaign's lock (a second run of the campaign is refused at once), and its
    MLflow parent run marked RUNNING, then FINISHED, FAILED, or KILLED when interrupted. A flow nested in another
    that holds the campaign already (a round in a campaign) leaves both to the outer one."""
    campaign = open_for_task(campaign_dir)
    if holds(campaign.layout.lock):
        yield
        return
    with campaign_lock(campaign.layout.lock, campaign.name):
        track_campaign(campaign_dir)
        try:
            yield
        except (KeyboardInterrupt, SystemExit, TerminationSignal):  # Ctrl-C, or SIGTERM (Prefect's signal)
            finish_campaign(campaign_dir, "KILLED")
            raise
        except BaseException:
            finish_campaign(campaign_dir, "FAILED")
            raise
        finish_campaign(campaign_dir, "FINISHED")


@task(retries=2, retry_delay_seconds=5, task_run_name="mlflow-campaign-run")
def track_campaign(campaign_dir: str) -> str:
    """The campaign's MLflow parent run, marked RUNNING."""
    return campaign_run(open_for_task(campaign_dir))


@task(retries=2, retry_delay_seconds=5, task_run_name="mlflow-campaign-{status}")
def finish_campaign(campaign_dir: str, status: str) -> None:
    """Mark the campaign's MLflow parent run FINISHED, FAILED or KILLED."""
    end_campaign_run(open_for_task(campaign_dir), status)


@task(task_run_name="progress")
def update_progress(campaign_dir: str) -> str:
    """The campaign's mIoU against labelled pixels, as a table and a plot (what `dvc plots show` draws)."""
    table, _ = write_progress(open_for_task(campaign_dir))
    return str(table)


@task(task_run_name="anything-to-do")
def finished_summaries(campaign_dir: str) -> list[dict[str, Any]] | None:
    """Every round's summary when the whole campaign is finished and unchanged (read from its records: no
    MLflow or DVC call, nothing written), saying so; None when some round has work to do."""
    campaign = open_for_task(campaign_dir)
    if pending_rounds(campaign):
        return None
    print(nothing_to_do(campaign))
    return [finished_summary.fn(campaign_dir, r) for r in range(campaign.settings.campaign.rounds + 1)]


@task(task_run_name="finished-r{round_id:02d}")
def finished_summary(campaign_dir: str, round_id: int) -> dict[str, Any] | None:
    """The round's summary when it is finished and unchanged (from its records alone); None when it has work."""
    campaign = open_for_task(campaign_dir)
    finished = finished_round(campaign, round_id)
    return None if finished is None else summary_of(campaign, round_id, finished["model_version"])


def summary_of(campaign: Campaign, round_id: int, model_version: str | None) -> dict[str, Any]:
    metrics = read_metrics(campaign.files(round_id).metrics)
    summary = {key: metrics.get(key) for key in ("round", "labelled_pixels", "labelled_per_image", "miou",
                                                  "not_measured")}
    return {**summary, "model_version": model_version}


@task(retries=2, retry_delay_seconds=5, task_run_name="summary-r{round_id:02d}")  # logging is idempotent
def round_summary(campaign_dir: str, round_id: int) -> dict[str, Any]:
    """The round's labelled pixels, mIoU (or why it was not measured) and registered model version. Once it is
    registered (and versioned: the flows call this last), the round is marked finished."""
    campaign = open_for_task(campaign_dir)
    summary = summary_of(campaign, round_id, log_round(campaign, round_id))
    mark_finished(campaign, round_id, model_version=summary["model_version"])
    return summary


def finish_round(campaign_dir: str, round_id: int) -> dict[str, Any]:
    """The end of every round, whoever ran its steps: the progress table and plot, the round in dvc.lock, its
    artifacts, then its MLflow version (and the mark that it is finished). Returns the round's summary."""
    update_progress(campaign_dir)
    version_round(campaign_dir, round_id)
    publish_round_artifacts(campaign_dir, round_id)
    return round_summary(campaign_dir, round_id)
