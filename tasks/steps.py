"""The steps of a round as Prefect tasks.

A task runs the recipe's step (`pixelpick.recipe.run_step`, skipped when fresh), the same call a DVC stage makes
through `pixelpick step <step> --round N`. Under `dvc repro` the command logs an evaluated round to MLflow; in a flow
the round is logged in its summary task, where Prefect's retries cover a transient MLflow failure. The task's cache key
is the step's key from the recipe (its settings values and input digests: no paths, no unread settings), and a
cached result is used only while the step's outputs still have the digests its record holds.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from prefect import task
from prefect.context import TaskRunContext

from pixelpick.campaign import Campaign, open_recorded
from pixelpick.layout import CampaignLayout
from pixelpick.recipe import STEPS, is_fresh, run_step, step_key


def open_for_task(campaign_dir: str) -> Campaign:
    """The campaign at `campaign_dir`, read from its record (reused while the record is unchanged)."""
    record = CampaignLayout(Path(campaign_dir)).params
    return _open(str(Path(campaign_dir).resolve()), record.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _open(campaign_dir: str, record_version: int) -> Campaign:
    return open_recorded(campaign_dir)


def _step_cache_key(context: TaskRunContext, parameters: dict) -> str:
    campaign = open_for_task(parameters["campaign_dir"])
    return step_key(campaign, STEPS[parameters["step"]], parameters["round_id"])


@task(cache_key_fn=_step_cache_key, persist_result=True, result_serializer="json",
      task_run_name="{step}-r{round_id:02d}")
def step_task(campaign_dir: str, step: str, round_id: int) -> dict:
    """One step of one round; returns the md5 of each output and the seconds it took."""
    result = run_step(open_for_task(campaign_dir), STEPS[step], round_id, progress=True)
    return {"step": step, "round": round_id, "outputs": result.outputs, "seconds": result.seconds}


def run_step_task(campaign_dir: str, step: str, round_id: int) -> dict:
    """Submit `step_task`, refreshing Prefect's cache unless the step's outputs are what its record says."""
    campaign = open_for_task(campaign_dir)
    if step == "query":  # the round starts: its pool is frozen before anything is keyed on it
        campaign.freeze_pool(round_id)
    fresh = is_fresh(campaign, STEPS[step], round_id)
    return step_task.with_options(refresh_cache=not fresh)(campaign_dir, step, round_id)
