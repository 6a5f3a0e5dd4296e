"""One active-learning round as a Prefect flow: infer, select, label, ingest, train, evaluate, version, track.

    python -m flows.round --round 1            # run round 1 of the campaign in params.yaml
"""

from __future__ import annotations

import argparse

from prefect import flow

from pixelpick.settings import load_settings, parse_override
from tasks.artifacts import publish_round_artifacts
from tasks.common import NO_INPUT, open_campaign, previous_digests, refreshed
from tasks.round import (
    annotate_simulated,
    evaluate_model,
    export_annotation_job,
    infer_probabilities,
    ingest_labels,
    select_queries,
    train_model,
)
from tasks.tracking import log_round
from tasks.versioning import version_round

@flow(name="pixelpick-round", flow_run_name="round-{round_id:02d}", log_prints=True)
def round_flow(settings_json: str, round_id: int, parent_run_id: str) -> dict:
    """Run round `round_id` with the simulated annotator; rounds before it must have finished."""
    campaign = open_campaign(settings_json)
    paths = campaign.paths(round_id)
    model_digest, labels_digest = previous_digests(campaign, round_id)

    probs_digest = NO_INPUT
    if round_id > 0:
        probs = refreshed(infer_probabilities, paths.probs)(settings_json, round_id, model_digest)
        probs_digest = probs["digest"]
    queries = refreshed(select_queries, paths.queries)(
        settings_json, round_id, probs_digest, labels_digest
    )
    job = refreshed(export_annotation_job, paths.job)(settings_json, round_id, queries["digest"])
    batch = refreshed(annotate_simulated, paths.annotations)(settings_json, round_id, queries["digest"])
    labels = refreshed(ingest_labels, paths.snapshot)(
        settings_json, round_id, batch["path"], batch["digest"], labels_digest
    )
    model = refreshed(train_model, paths.model)(settings_json, round_id, labels["digest"])
    metrics = refreshed(evaluate_model, paths.metrics)(settings_json, round_id, model["digest"])
    snapshot_md5 = version_round(settings_json, round_id, model["digest"])
    model_version = log_round(settings_json, round_id, parent_run_id, model["digest"])
    result = {
        "round": round_id,
        "labels_digest": labels["digest"],
        "model_digest": model["digest"],
        "model_version": model_version,
        "metrics_path": metrics["path"],
        "job_path": job["path"],
        "snapshot_md5": snapshot_md5,
    }
    publish_round_artifacts(settings_json, round_id)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    from flows.campaign import run_single_round

    settings = load_settings(args.params, dict(parse_override(o) for o in args.overrides))
    run_single_round(settings, args.round)


if __name__ == "__main__":
    main()
