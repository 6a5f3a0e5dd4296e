"""What every task shares: rebuilding the campaign from settings, content digests, and cache refresh.

Tasks take the settings as a JSON string and the digests of their input files, and Prefect caches them on those
inputs (`INPUTS`), so a step re-runs exactly when the content it depends on changed, never because of a new run id.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from prefect import Task

from pixelpick.campaign import Campaign
from pixelpick.settings import Settings

CHUNK = 1 << 20


@lru_cache(maxsize=4)
def open_campaign(settings_json: str) -> Campaign:
    return Campaign(Settings.model_validate_json(settings_json))


def file_md5(path: str | Path) -> str:
    """The file's md5: the same hash DVC records for it, so MLflow tags and dvc.lock can be compared."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def combine(*parts: object) -> str:
    """A digest of several digests (and small values): for outputs that are a pure function of their inputs."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def refreshed(task: Task, *outputs: Path) -> Task:
    """The task, forced to run when any of its output files is gone (a cache hit would point at nothing)."""
    return task.with_options(refresh_cache=not all(Path(p).exists() for p in outputs))


NO_INPUT = "none"  # the digest of an input a step does not have (round 0 has no model and no earlier labels)


def previous_digests(campaign: Campaign, round_id: int) -> tuple[str, str]:
    """(model, label snapshot) digests of the round before `round_id`: the inputs its queries depend on."""
    if round_id == 0:
        return NO_INPUT, NO_INPUT
    before = campaign.paths(round_id - 1)
    return file_md5(before.model), file_md5(before.snapshot)
