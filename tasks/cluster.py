"""A round's query on a Dask cluster: the pool split into shards, one task per shard, merged into the same queries.

The recipe's query step is three library functions (`pixelpick.steps`): `plan_query` splits the pool into shards of
whole inference batches, gives each its images' labelled pixels and creates the round's probability store;
`query_shard` runs the previous model over one shard's images, writes their chunks (one chunk per image, so no two
shards share one) and picks their pixels; `finish_query` merges the picks in pool order and marks the store complete.
In one process they run one after the other (`steps.query`); here each shard is a Prefect task that `prefect-dask`'s
task runner sends to a worker.

A shard task is given everything it needs as objects: the query step's input (`pixelpick.step_input`), the plan, its
images' labelled pixels. It reads the dataset, the model checkpoint and the store, so workers need those three (a
shared filesystem, and for the store any fsspec URL: `campaign.store_url`), never the flow's working directory.
Every image picks from its own seeded generator and every batch draws its MC-dropout masks from its own seed, so the
queries are exactly those of a single-process round. Dask re-runs the shard of a worker that dies, and a shard's
writes are idempotent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import dask
from distributed import get_worker
from prefect import task
from prefect.cache_policies import NO_CACHE

from pixelpick.recipe import STEPS, begin_step, record_step
from pixelpick.step_input import StepInput
from pixelpick.steps import QueryPlan, finish_query, plan_query, query_shard
from tasks.steps import open_for_task


def dask_task_runner(workers: int = 0, address: str | None = None):
    """prefect-dask's task runner: a local cluster of `workers` single-threaded worker processes, or the cluster
    at `address` (tcp://scheduler:8786); None for neither (the default: everything in the flow's process)."""
    if not workers and not address:
        return None
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    # Dask's nanny sets the workers' thread limits in its own process's environment before spawning them, which
    # would leave this flow's later subprocesses (DVC stages, torchrun) with one thread: they go to the workers only.
    spawn_environment = dask.config.get("distributed.nanny.pre-spawn-environ")
    dask.config.set({"distributed.nanny.pre-spawn-environ": {
        key: value for key, value in spawn_environment.items() if key not in _THREAD_LIMITS}})
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "env": dict.fromkeys(_THREAD_LIMITS, "1")})


_THREAD_LIMITS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # Dask's defaults for its workers


@dataclass(frozen=True)
class ShardedQuery:
    """What the shards of a round's query are given, and what its end records: the step's key and input, the plan,
    and each shard's images' labelled pixels."""

    key: str
    step: StepInput
    plan: QueryPlan
    labelled: list[dict]


@task(cache_policy=NO_CACHE, task_run_name="plan-query-r{round_id:02d}")
def plan_shards(campaign_dir: str, round_id: int, shards: int) -> ShardedQuery | None:
    """The query's plan, or None when the step is fresh (nothing to do). Inputs go to workers as values."""
    campaign = open_for_task(campaign_dir)
    step = STEPS["query"]
    key, done = begin_step(campaign, step, round_id)
    if done is not None:
        return None
    query = step.prepare(campaign, round_id)
    plan, labelled = plan_query(query, shards)
    return ShardedQuery(key, query, plan, labelled)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1, task_run_name="query-shard-{index}")
def run_shard(query: StepInput, plan: QueryPlan, index: int, labelled: dict) -> dict[str, Any]:
    """One shard's inference, chunk writes and picks, on whichever worker runs it, with the worker's threads
    (torch sized its pool before the worker's limits applied)."""
    on_worker = replace(query, runtime=replace(query.runtime, threads=get_worker().state.nthreads))
    frame, seconds = query_shard(on_worker, plan, index, labelled)
    return {"queries": frame.to_dict(orient="list"), "seconds": seconds,
            "images": [image_id for _, ids in plan.shards[index] for image_id in ids]}


@task(cache_policy=NO_CACHE, task_run_name="finish-query-r{round_id:02d}")
def finish_shards(campaign_dir: str, round_id: int, prepared: ShardedQuery, results: list[dict]) -> dict:
    """Merge the shards' picks into the round's queries and record the step as done."""
    import pandas as pd

    campaign = open_for_task(campaign_dir)
    frames = [pd.DataFrame(result["queries"]).astype({"y": "int32", "x": "int32", "score": "float32",
                                                       "round": "int32"}) for result in results]
    seconds = [result["seconds"] for result in results]
    measured = finish_query(prepared.step, prepared.plan, frames, seconds)
    return asdict(record_step(campaign, STEPS["query"], round_id, prepared.key, measured))


def query_on_cluster(campaign_dir: str, round_id: int, shards: int) -> dict | None:
    """The round's query step with its shards submitted to the flow's task runner (a Dask cluster)."""
    prepared = plan_shards(campaign_dir, round_id, shards)
    if prepared is None:
        return None
    futures = [run_shard.submit(prepared.step, prepared.plan, index, labelled)
               for index, labelled in enumerate(prepared.labelled)]
    return finish_shards(campaign_dir, round_id, prepared, [future.result() for future in futures])
