"""The typed parameters of the flows: what the Prefect UI shows as a form for a manual or scheduled run."""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

PROJECT = Path(__file__).resolve().parents[1]


class CampaignChoice(BaseModel):
    """Which campaign: a settings file and the settings to change in it (the campaign is `campaign.name`)."""

    model_config = ConfigDict(extra="forbid")

    params: str = Field("params.yaml", description="settings file; a relative path is relative to the project")
    overrides: dict[str, Any] = Field(default_factory=dict, description='settings to change, e.g. '
                                      '{"acquire.strategy": "entropy", "campaign.name": "synthetic-entropy"}')

    def params_path(self) -> str:
        path = Path(self.params).expanduser()
        return str(path if path.is_absolute() else PROJECT / path)


class ClusterChoice(BaseModel):
    """Where a round's query runs: in the flow's process (the default), on a local Dask cluster of `workers`
    single-threaded processes, or on the Dask cluster at `address`."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(0, ge=0, description="> 0: start a local Dask cluster of this many worker processes")
    address: str | None = Field(None, description="an existing Dask scheduler, e.g. tcp://scheduler:8786")
    shards: int | None = Field(None, ge=1, description="shards of the pool (default: 4 per worker, or 16)")

    @property
    def enabled(self) -> bool:
        return bool(self.workers or self.address)

    @property
    def shard_count(self) -> int:
        return self.shards or (4 * self.workers if self.workers else 16)
