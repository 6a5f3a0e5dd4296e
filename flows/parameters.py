"""The typed parameters of the flows: what the Prefect UI shows as a form for a manual or scheduled run.

They are also the one definition of the command line's options for them (`flows.cli` builds each option from
its field: default, description as help, choices), so this module stays cheap to import: no torch, no Prefect.
"""

from pathlib import Path
from typing import Any, Literal

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

    workers: int = Field(0, ge=0, description="> 0: run each round's query in shards on a local Dask cluster of "
                         "this many worker processes")
    address: str | None = Field(None, description="... or on an existing Dask cluster, e.g. tcp://scheduler:8786")
    shards: int | None = Field(None, ge=1, description="shards of the pool (default: 4 per worker, or 16)")

    @property
    def enabled(self) -> bool:
        return bool(self.workers or self.address)

    @property
    def shard_count(self) -> int:
        return self.shards or (4 * self.workers if self.workers else 16)


class BenchmarkChoice(BaseModel):
    """What to benchmark (`flows.benchmark`): a preset, the dataset, and which strategies, seeds and variants.

    The presets and protocols are `pixelpick.benchmark`'s PRESETS and PROTOCOLS, named here without importing it
    (it imports torch); a test holds the names here to them."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("cpu", description="the recipe: paper, gpu-quick or cpu; "
                        "docs/benchmarks/README.md describes them")
    protocol: Literal["tune", "report"] = Field(
        "report", description="tune: train on 80% of train, evaluate on the fixed other 20% (choosing settings); "
        "report: train on train, evaluate on val")
    params: str = Field("params.yaml", description="base settings; a relative path is relative to the project")
    overrides: dict[str, Any] = Field(default_factory=dict, description="settings to change over the preset")
    camvid_root: str | None = Field(None, description="the CamVid folder, used when the preset's dataset is CamVid "
                                    "and the overrides name no data.root")
    strategies: list[str] | None = Field(None, description="the strategies to run, `full` for full supervision; "
                                         "default: the preset's, then full supervision")
    seeds: list[int] | None = Field(None, description="the seeds to run; default: the preset's")
    variants: list[str] = Field(default_factory=list, description="extra rows: cb1 (class-balanced), md8 (picks 8 px "
                                "apart), mc8 (MC dropout, adds BALD), sp300 (superpixel expansion), st0.9 "
                                "(self-training), ss0.1 (sieved superpixels), fp0.9 (feature-space propagation), "
                                "fr16 (propagation within 16 px), ep10 (10 epochs per later round), or "
                                "combined: fp0.9+fr16")
    workdir: str = Field("data/benchmarks", description="where the runs' files go, a folder per preset")
    report_dir: str = Field("docs/benchmarks", description="where the report goes")
    report_only: bool = Field(False, description="only rebuild the report from the finished runs")
