"""DVC at the edge: the records of what ran. A Prefect run commits each finished round of a versioned campaign to
its `dvc.lock` (`dvc commit`), so `dvc status` is then clean and `dvc.lock` describes exactly what ran; the pipeline
that lock belongs to is `tasks.pipeline_files`'.

Human rounds enter the pipeline once their batch exists: the batch is `dvc add`ed (`labels/rNN.parquet.dvc`), and
the round's ingest stage depends on it, so `dvc repro` reproduces a human round from its versioned labels; its
query, once the job was exported, is a frozen stage (`asked`): what people were asked about is never recomputed.
DVC holds a repository lock, so every call here is serialised through one file lock.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml
from filelock import FileLock
from prefect import task

from pixelpick.campaign import Campaign
from pixelpick.recipe import QUERY, round_steps
from tasks.pipeline_files import (
    POOL_STAGE,
    SETTINGS_STAGE,
    VersioningError,
    stage_group,
    stage_name,
    versioning_root,
    write_pipeline,
)

log = logging.getLogger(__name__)


def run_dvc(root: Path, *args: str) -> str:
    """Run a DVC command in the repository at `root`, one at a time; VersioningError with DVC's own message."""
    (root / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".dvc" / "tmp" / "pixelpick.lock"):
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()
        raise VersioningError(f"dvc {args[0]} failed: {' '.join(line.strip() for line in message[-3:])}")
    return done.stdout


def stage_records(campaign: Campaign, root: Path) -> None:
    """`git add` the campaign's records (settings, pipeline, lock, progress, the batches' .dvc files), so that
    `git status` shows them ready to commit, as DVC's autostage does for the files DVC itself writes. Outside a git
    work tree nothing happens."""
    present = [os.path.relpath(path, root) for path in campaign.layout.records()]
    done = subprocess.run(["git", "add", "--", *present], cwd=root, capture_output=True, text=True)
    quiet = ("not a git repository", "ignored by one of your .gitignore files")  # no git, or a record a user ignores
    if done.returncode != 0 and not any(reason in done.stderr for reason in quiet):  # written whatever git says
        log.warning("could not stage campaign %s's records in git: %s", campaign.name, done.stderr.strip())


def commit_stages(campaign: Campaign, stage_names: list[str]) -> dict[str, str]:
    """Record the named stages' current deps, params and outs in dvc.lock (`dvc commit --force`); returns the md5
    of each committed output by path (relative to the campaign). Nothing happens outside a DVC repository."""
    root = versioning_root(campaign)
    if root is None:
        return {}
    write_pipeline(campaign, root)
    pipeline_file = os.path.relpath(campaign.layout.pipeline, root)
    run_dvc(root, "commit", "--force", "--quiet", *(f"{pipeline_file}:{name}" for name in stage_names))
    stage_records(campaign, root)
    lock = yaml.safe_load(campaign.layout.pipeline_lock.read_text())["stages"]
    return {out["path"]: out["md5"] for name in stage_names for out in lock.get(name, {}).get("outs", [])}


def commit_round(campaign: Campaign, round_id: int) -> dict[str, str]:
    """Commit every stage of a finished round."""
    groups = [POOL_STAGE, *(stage_group(campaign, step, round_id) for step in round_steps(campaign))]
    return commit_stages(campaign, [SETTINGS_STAGE, *(stage_name(group, round_id) for group in groups)])


def track_batch(campaign: Campaign, round_id: int) -> str | None:
    """`dvc add` a human round's batch (a versioned input of the round's ingest stage); returns its md5."""
    root = versioning_root(campaign)
    if root is None:
        return None
    batch = campaign.layout.batch(round_id)
    run_dvc(root, "add", "--quiet", os.path.relpath(batch, root))
    stage_records(campaign, root)
    return yaml.safe_load(batch.with_name(batch.name + ".dvc").read_text())["outs"][0]["md5"]


@task(retries=2, retry_delay_seconds=3, task_run_name="version-r{round_id:02d}")
def version_round(campaign_dir: str, round_id: int) -> dict[str, str]:
    """Commit a finished round to the campaign's dvc.lock (retried: DVC's repository lock may be busy)."""
    from tasks.steps import open_for_task

    return commit_round(open_for_task(campaign_dir), round_id)


@task(retries=2, retry_delay_seconds=3, task_run_name="version-query-r{round_id:02d}")
def version_query(campaign_dir: str, round_id: int) -> dict[str, str]:
    """Commit a human round's query stage (the rest of the round waits for its labels)."""
    from tasks.steps import open_for_task

    campaign = open_for_task(campaign_dir)
    query = stage_name(stage_group(campaign, QUERY, round_id), round_id)
    return commit_stages(campaign, [SETTINGS_STAGE, stage_name(POOL_STAGE, round_id), query])
