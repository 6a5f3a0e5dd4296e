"""Prefect artifacts a round leaves in the UI: labelled pixels per class, IoU per class, and a picture of the
picked pixels beside the uncertainty map."""

from __future__ import annotations

import base64
import json
import re

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pixelpick.reporting import query_figure, query_statistics
from tasks.steps import open_for_task


@task(task_run_name="artifacts-r{round_id:02d}")
def publish_round_artifacts(campaign_dir: str, round_id: int) -> None:
    campaign = open_for_task(campaign_dir)
    key = f"{re.sub(r'[^a-z0-9-]', '-', campaign.name.lower())}-r{round_id:02d}"
    metrics = json.loads(campaign.files(round_id).metrics.read_text())
    stats = query_statistics(campaign, round_id)
    create_table_artifact(
        [{"class": name, "labelled pixels this round": count} for name, count in stats["label_histogram"].items()],
        key=f"{key}-labels",
        description=f"Round {round_id}: labelled pixels per class (this round's picks only)",
    )
    if metrics.get("miou") is not None:
        create_table_artifact(
            [{"class": "mean (mIoU)", "IoU": _pct(metrics["miou"])}]
            + [{"class": n, "IoU": _pct(v)} for n, v in zip(metrics["class_names"], metrics["iou_per_class"])],
            key=f"{key}-iou",
            description=f"Round {round_id}: IoU per class on {metrics.get('evaluated_images')} evaluation images",
        )
    png = base64.b64encode(query_figure(campaign, round_id)).decode()
    create_markdown_artifact(
        f"### Round {round_id}: picked pixels and uncertainty\n\n"
        f"{metrics.get('not_measured', '')}\n\n"
        f"mean score of the picks {stats['mean_score']:.3f}, spatial coverage {stats['spatial_coverage']:.1f} px\n\n"
        f"![picks](data:image/png;base64,{png})",
        key=f"{key}-picks",
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"
