"""The typed parameters of the flows: what the Prefect UI shows as a form for a manual or scheduled run."""

from __future__ import annotations

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
