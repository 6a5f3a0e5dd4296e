"""Scale: one round's inference + selection over a large generated pool, in one process and on Dask workers.

Prints figures, asserts nothing (docs/performance.md has the measured ones and the extrapolation).

    python benchmarks/scale.py                       # 10,000 images at 96x128: one process, 1 worker, 2 workers
    python benchmarks/scale.py --images 1000 --images 10000 --modes 2    # per-worker memory as the pool grows

For each mode it runs the recipe's query step the way a round does (`plan_query`, `query_shard` per shard,
`finish_query`) on a model saved as the previous round's, after round 0's random labels, and reports images/s, the
peak resident memory of each process that did the work, and the store's size. Workers are local Dask processes with
one thread each; the single-process mode uses every core, as a round does by default. Run it on an otherwise idle
machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DO_NOT_TRACK", "1")


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_campaign(folder: Path, images: int, size: tuple[int, int]):
    import torch

    from pixelpick.campaign import open_campaign
    from pixelpick.checkpoints import save_checkpoint
    from pixelpick.recipe import STEPS, TRAIN_STEP, run_step

    overrides = {"data.root": str(folder / f"pool-{images}"), "data.synthetic.num_train": images,
                 "data.synthetic.num_val": 1, "data.synthetic.height": size[0], "data.synthetic.width": size[1],
                 "data.eval_split": None, "campaign.workdir": str(folder / "runs"),
                 "campaign.name": f"scale-{images}", "train.eval_batch_size": 16}
    started = time.perf_counter()
    campaign = open_campaign(REPO / "params.yaml", overrides)
    print(f"pool of {images} images at {size[0]}x{size[1]} ready in {time.perf_counter() - started:.0f} s",
          flush=True)
    for name in ("query", "annotate", "ingest"):  # round 0's labels (random picks), which round 1 must not ask again
        run_step(campaign, STEPS[name], 0)
    torch.manual_seed(0)
    model = TRAIN_STEP.prepare(campaign, 0).new_model()
    save_checkpoint(campaign.files(0).model, model, arch=campaign.settings.model.arch,
                    num_classes=campaign.pool.label_space.num_classes, dropout_p=campaign.settings.model.dropout_p)
    return campaign


def _shard_in_process(query, plan, index: int, labelled: dict, threads: int) -> tuple[object, dict, float]:
    """One shard in a fresh process with `threads` threads; returns its picks, seconds and peak memory."""
    from dataclasses import replace

    from pixelpick.steps import query_shard

    frame, seconds = query_shard(replace(query, runtime=replace(query.runtime, threads=threads)), plan, index,
                                 labelled)
    return frame, seconds, peak_rss_mib()


def run_query(campaign, workers: int, shards: int) -> dict:
    """One round's query: every shard in one fresh process using every core (workers == 0), or `shards` shards on
    `workers` Dask processes with one thread each. Starting the processes is not timed."""
    from concurrent.futures import ProcessPoolExecutor

    from pixelpick.probstore import remove_store, store_bytes
    from pixelpick.recipe import QUERY
    from pixelpick.steps import finish_query, plan_query

    query = QUERY.prepare(campaign, 1)  # round 1's query step, from round 0's model
    remove_store(query.scratch["probability_store"])  # each mode infers afresh, none reuses another's store
    started = time.perf_counter()
    plan, labelled = plan_query(query, shards=shards if workers else 1)
    planned = time.perf_counter() - started
    if workers == 0:
        with ProcessPoolExecutor(1) as pool:
            pool.submit(int).result()  # the process is up
            shards_started = time.perf_counter()
            outputs = [pool.submit(_shard_in_process, query, plan, 0, labelled[0], os.cpu_count() or 1).result()]
            shard_seconds = time.perf_counter() - shards_started
        peaks = [outputs[0][2]]
    else:
        from dask.distributed import Client, LocalCluster

        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster, \
                Client(cluster) as client:
            shards_started = time.perf_counter()
            futures = [client.submit(_shard_in_process, query, plan, index, shard_labelled, 1, pure=False)
                       for index, shard_labelled in enumerate(labelled)]
            outputs = client.gather(futures)
            shard_seconds = time.perf_counter() - shards_started
            peaks = list(client.run(peak_rss_mib).values())
    finishing = time.perf_counter()
    finish_query(query, plan, [o[0] for o in outputs], [o[1] for o in outputs])
    elapsed = planned + shard_seconds + time.perf_counter() - finishing
    return {"seconds": elapsed, "images_per_s": len(campaign.pool) / elapsed, "peak_mib": peaks,
            "store_mib": store_bytes(plan.store) / 2**20, "shards": len(plan.shards)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, action="append", help="pool sizes (default: 10000)")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    parser.add_argument("--modes", default="0,1,2", help="0 = one process; N = N Dask workers (comma-separated)")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pixelpick-scale-"))
    for images in args.images or [10_000]:
        campaign = make_campaign(workdir, images, tuple(args.size))
        for workers in (int(m) for m in args.modes.split(",")):
            result = run_query(campaign, workers, args.shards)
            mode = f"one process ({os.cpu_count()} threads)" if workers == 0 else f"{workers} Dask worker(s) x 1 thread"
            print(f"{images:>6} images, {mode:<26}: {result['seconds']:7.1f} s, {result['images_per_s']:6.1f} img/s, "
                  f"peak RSS per process {', '.join(f'{p:.0f}' for p in result['peak_mib'])} MiB, "
                  f"store {result['store_mib']:.0f} MiB ({result['shards']} shards)", flush=True)
    print(f"files in {workdir}")


if __name__ == "__main__":
    main()
