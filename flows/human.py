"""Human-in-the-loop rounds: a query flow that ends with an annotation job, and a train flow that starts once
the job is complete. Labelling takes hours, so no flow run sits paused waiting for it (stack-notes §4.8).

    python -m flows.human query --round 1        # infer, select, export the job; prints how to open it
    python -m pixelpick.annotation serve --job data/runs/<campaign>/rounds/r01/job.json --dataset-root <root>
    python -m flows.human train --round 1        # ingest, retrain, evaluate (says "waiting" until the job is done)
    python -m flows.human train --round 1 --serve --interval 600   # the same, every 10 minutes, until it is
"""

from __future__ import annotations

import argparse

from prefect import flow

from pixelpick.settings import load_settings, parse_override
from tasks.common import NO_INPUT, open_campaign, previous_digests, refreshed
from tasks.human import collect_human_labels, job_progress
from tasks.round import (
    evaluate_model,
    export_annotation_job,
    infer_probabilities,
    ingest_labels,
    select_queries,
    train_model,
)
from tasks.tracking import log_round, start_campaign_run
from tasks.versioning import track_label_batch

@flow(name="pixelpick-query", flow_run_name="query-r{round_id:02d}", log_prints=True)
def query_flow(settings_json: str, round_id: int) -> str:
    """Pick the round's pixels with the previous round's model (at random in round 0) and export the job."""
    campaign = open_campaign(settings_json)
    paths = campaign.paths(round_id)
    model_digest, labels_digest = previous_digests(campaign, round_id)
    probs_digest = NO_INPUT
    if round_id > 0:
        probs_digest = refreshed(infer_probabilities, paths.probs)(settings_json, round_id, model_digest)["digest"]
    queries = refreshed(select_queries, paths.queries)(settings_json, round_id, probs_digest, labels_digest)
    job = refreshed(export_annotation_job, paths.job)(settings_json, round_id, queries["digest"])
    print(f"Annotation job ready: {job['path']}\n  label it with: python -m pixelpick.annotation serve "
          f"--job {job['path']} --dataset-root {campaign.settings.data.root}")
    return job["path"]


@flow(name="pixelpick-train", flow_run_name="train-r{round_id:02d}", log_prints=True)
def train_flow(settings_json: str, round_id: int) -> dict:
    """Once the round's job is complete: ingest its labels (DVC-tracked), retrain, evaluate, register."""
    campaign = open_campaign(settings_json)
    paths = campaign.paths(round_id)
    progress = job_progress(settings_json, round_id)
    if progress["done"] < progress["total"]:
        print(f"waiting: {progress['done']} of {progress['total']} pixels labelled in round {round_id}'s job")
        return {"status": "waiting", **progress}
    _, labels_digest = previous_digests(campaign, round_id)
    batch = collect_human_labels(settings_json, round_id)
    track_label_batch(batch["path"])
    labels = refreshed(ingest_labels, paths.snapshot)(
        settings_json, round_id, batch["path"], batch["digest"], labels_digest
    )
    model = refreshed(train_model, paths.model)(settings_json, round_id, labels["digest"])
    metrics = refreshed(evaluate_model, paths.metrics)(settings_json, round_id, model["digest"])
    version = log_round(settings_json, round_id, start_campaign_run(settings_json), model["digest"])
    print(f"round {round_id}: model version {version}, metrics in {metrics['path']}")
    return {"status": "trained", "model_version": version, "metrics_path": metrics["path"], **progress}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["query", "train"])
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--serve", action="store_true", help="serve on a schedule instead of running once")
    parser.add_argument("--interval", type=float, default=600, help="seconds between scheduled runs")
    args = parser.parse_args()
    settings = load_settings(args.params, dict(parse_override(o) for o in args.overrides))
    chosen = query_flow if args.step == "query" else train_flow
    parameters = {"settings_json": settings.model_dump_json(), "round_id": args.round}
    if args.serve:
        chosen.serve(name=f"{args.step}-{settings.campaign.name}-r{args.round:02d}", parameters=parameters,
                     interval=args.interval, pause_on_shutdown=False)
    else:
        chosen(**parameters)


if __name__ == "__main__":
    main()
