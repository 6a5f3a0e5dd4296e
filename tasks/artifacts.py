"""Prefect artifacts a round leaves in the UI: labelled pixels per class, mIoU per class, and a picture of the
picked pixels beside the uncertainty map."""

from __future__ import annotations

import base64
import json

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common import open_campaign


@task
def publish_round_artifacts(settings_json: str, round_id: int) -> None:
    campaign = open_campaign(settings_json)
    key = f"{campaign.settings.campaign.name.lower().replace('_', '-').replace('.', '-')}-r{round_id:02d}"
    metrics = json.loads(campaign.paths(round_id).metrics.read_text())
    stats = campaign.query_statistics(round_id)
    create_table_artifact(
        [{"class": name, "labelled pixels this round": count} for name, count in stats["label_histogram"].items()],
        key=f"{key}-labels",
        description=f"Round {round_id}: labelled pixels per class (this round's picks only)",
    )
    create_table_artifact(
        [{"class": "mean (mIoU)", "IoU": _pct(metrics["miou"])}]
        + [{"class": n, "IoU": _pct(v)} for n, v in zip(metrics["class_names"], metrics["iou_per_class"])],
        key=f"{key}-iou",
        description=f"Round {round_id}: IoU per class on {campaign.settings.data.eval_split}",
    )
    png = base64.b64encode(campaign.query_figure(round_id)).decode()
    create_markdown_artifact(
        f"### Round {round_id}: picked pixels and uncertainty\n\n"
        f"mean score of the picks {stats['mean_score']:.3f}, spatial coverage {stats['spatial_coverage']:.1f} px\n\n"
        f"![picks](data:image/png;base64,{png})",
        key=f"{key}-picks",
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"
