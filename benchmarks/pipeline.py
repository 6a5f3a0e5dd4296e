"""Performance of the round pipeline. Prints figures; asserts nothing.

    python benchmarks/pipeline.py                      # all four measurements
    python benchmarks/pipeline.py --only select,memory

overhead   a round through Prefect (tasks, cache, artifacts, MLflow) against the same library calls in plain Python,
           rounds 0 and 1 of two campaigns each way, alternating which goes first
inference  inference into the Zarr store (`infer_to_store`: forward, batch scoring and chunk writes on the writer
           thread) against a bare torch loop over the same images (`predict_probabilities`: load, forward,
           softmax); each timed four times, alternating: best of four, and the median of the pairs' ratios
select     score-and-select from Zarr against the reference's way (per image: softmax, then topk on the whole map),
           on CamVid-sized maps (11 x 360 x 480). "ours: scores from Zarr" is what the query step's selection runs: the
           stored float32 score maps streamed by `ProbabilityStore.iter_scores` (runs of rows per Zarr read) and
           `select_pixels` per image. The reference starts from logits already in memory, so it reads nothing.
           GB/s counts the 11x360x480 float32 probability maps covered; ours reads 1/11 of that (the score maps).
memory     peak memory of selection as the pool grows tenfold (synthetic probabilities)
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pixelpick.acquisition import score_pixels, select_pixels  # noqa: E402
from pixelpick.probstore import ProbabilityStore, ProbabilityWriter  # noqa: E402

CAMVID_SHAPE = (11, 360, 480)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_overhead(workdir: Path, repeats: int = 2) -> None:
    """Rounds 0 and 1 of `repeats` campaigns each way, alternating which goes first, so that drift in the machine's
    speed falls on both sides; one pair is too noisy to read a 10% difference from."""
    from flows.parameters import CampaignChoice
    from flows.round import round_flow
    from pixelpick.campaign import open_campaign
    from pixelpick.recipe import run_round
    from tasks.tracking import campaign_run

    def overrides(name: str) -> dict:
        return {"campaign.workdir": str(workdir), "train.epochs": 3, "campaign.name": name}

    plain = [open_campaign(REPO / "params.yaml", overrides(f"bench-plain-{i}")) for i in range(repeats)]
    flowed = [CampaignChoice(params=str(REPO / "params.yaml"), overrides=overrides(f"bench-prefect-{i}"))
              for i in range(repeats)]
    for choice in flowed:  # starts the ephemeral server and MLflow's database: excluded from the timing
        campaign_run(open_campaign(choice.params_path(), choice.overrides))
    pairs = []
    for i in range(repeats):
        for round_id in (0, 1):
            calls = [partial(run_round, plain[i], round_id), partial(round_flow, flowed[i], round_id)]
            order = calls if (i + round_id) % 2 == 0 else calls[::-1]
            seconds = {id(call): timed(call) for call in order}
            t_plain, t_flow = (seconds[id(call)] for call in calls)
            pairs.append((t_plain, t_flow))
            print(f"overhead  campaign {i} round {round_id}: plain {t_plain:6.1f} s  prefect {t_flow:6.1f} s  "
                  f"(+{100 * (t_flow / t_plain - 1):.1f}%)", flush=True)
    total_plain, total_flow = sum(p for p, _ in pairs), sum(f for _, f in pairs)
    median = float(np.median([f / p - 1 for p, f in pairs]))
    print(f"overhead  {len(pairs)} rounds: plain {total_plain:.1f} s, prefect {total_flow:.1f} s, "
          f"+{100 * (total_flow / total_plain - 1):.1f}% in all, median round +{100 * median:.1f}% (target <= 10%)")


def bench_inference(workdir: Path, arch: str, dataset_overrides: dict, limit: int | None) -> None:
    from pixelpick.campaign import Campaign, prepare_data
    from pixelpick.inference import InferenceTimings, infer_to_store, predict_probabilities
    from pixelpick.recipe import TRAIN_STEP
    from pixelpick.settings import load_settings

    settings = load_settings(REPO / "params.yaml", {"model.arch": arch, **dataset_overrides})
    prepare_data(settings)
    campaign = Campaign(settings)
    pool = campaign.pool
    if limit:
        pool.image_ids = pool.image_ids[:limit]
    model = TRAIN_STEP.prepare(campaign, 0).new_model().eval()
    device = torch.device("cpu")
    label = f"{settings.data.dataset} {pool.image_size(pool.image_ids[0])} {arch}"

    def bare() -> None:
        for _ in predict_probabilities(model, pool, pool.image_ids, device):
            pass

    timings = InferenceTimings()

    def into_zarr() -> None:
        infer_to_store(model, pool, workdir / "probs.zarr", device, strategy="margin", timings=timings)

    bare()  # warm-up
    pairs = [(timed(bare), timed(into_zarr)) for _ in range(4)]
    t_bare, t_zarr = min(b for b, _ in pairs), min(z for _, z in pairs)
    median = float(np.median([b / z for b, z in pairs]))
    n = len(pool.image_ids)
    print(f"inference {label}: bare {n / t_bare:6.1f} img/s, into Zarr {n / t_zarr:6.1f} img/s "
          f"= {100 * t_bare / t_zarr:.0f}% of bare, best of 4 each (median pair {100 * median:.0f}%; target >= 90%); "
          f"last run's writer thread: scoring {1e3 * timings.scoring_seconds / n:.2f} ms/img, writes "
          f"{1e3 * timings.write_seconds / n:.2f} ms/img", flush=True)


def write_synthetic_store(path: Path, num_images: int, shape=CAMVID_SHAPE, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = [f"img{i:05d}.png" for i in range(num_images)]
    with ProbabilityWriter(path, dict.fromkeys(ids, shape[1:]), num_classes=shape[0], strategy="margin") as writer:
        for image_id in ids:
            logits = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 3)
            probs = logits.softmax(0)
            writer.write(image_id, probs.numpy(), score_pixels("margin", probs).numpy())
    return ids


def bench_select(workdir: Path, num_images: int = 40) -> None:
    store_path = workdir / "select.zarr"
    write_synthetic_store(store_path, num_images)
    rng = np.random.default_rng(1)
    logits = [torch.from_numpy(rng.standard_normal(CAMVID_SHAPE, dtype=np.float32) * 3) for _ in range(num_images)]
    _, height, width = CAMVID_SHAPE
    labelled = np.zeros((height, width), dtype=bool)
    labelled[rng.integers(0, height, 50), rng.integers(0, width, 50)] = True
    bytes_per_map = np.prod(CAMVID_SHAPE) * 4

    def reference() -> None:
        # The reference: per image softmax, margin, value overwrite of labelled pixels, topk of 5% of the map,
        # then a random choice of k among them.
        generator = torch.Generator().manual_seed(0)
        top_n = int(height * width * 0.05)
        for image_logits in logits:
            prob = image_logits.softmax(dim=0)
            top2 = prob.topk(2, dim=0).values
            margin = (top2[0] - top2[1]).flatten()
            margin[torch.from_numpy(labelled).flatten()] = 1.0
            candidates = (-margin).topk(top_n).indices
            candidates[torch.randperm(top_n, generator=generator)[:10]].numpy()

    def ours_from_scores() -> None:
        store = ProbabilityStore(store_path)
        generator = torch.Generator().manual_seed(0)
        for _, scores in store.iter_scores():
            select_pixels(scores, k=10, exclude=labelled, top_fraction=0.05, generator=generator)

    def ours_rescoring_probs() -> None:
        store = ProbabilityStore(store_path)
        generator = torch.Generator().manual_seed(0)
        for image_id in store.image_ids:
            scores = score_pixels("margin", torch.from_numpy(store.probs(image_id)))
            select_pixels(scores, k=10, exclude=labelled, top_fraction=0.05, generator=generator)

    rates = {}
    for name, fn in (("reference (softmax + topk)", reference), ("ours: scores from Zarr", ours_from_scores),
                     ("ours: float16 probs from Zarr, rescored", ours_rescoring_probs)):
        fn()  # warm-up
        seconds = min(timed(fn) for _ in range(3))
        rates[name] = num_images / seconds
        print(f"select    {name:42s} {num_images / seconds:7.1f} img/s  "
              f"{num_images * bytes_per_map / seconds / 1e9:6.2f} GB/s of 11x360x480 float32 maps", flush=True)
    reference_rate = rates.pop("reference (softmax + topk)")
    for name, rate in rates.items():
        target = " (target >= 10x)" if name == "ours: scores from Zarr" else ""
        print(f"select    {name}: {rate / reference_rate:.1f}x the reference{target}", flush=True)


def bench_memory(workdir: Path) -> None:
    for num_images in (30, 300):
        store_path = workdir / f"memory-{num_images}.zarr"
        write_synthetic_store(store_path, num_images, shape=(11, 96, 128))
        # A fresh process per pool size, so its peak RSS is selection's alone (plus the imports).
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(store_path)],
                             capture_output=True, text=True, check=True)
        print(f"memory    selection over {num_images:4d} images: {out.stdout.strip()}", flush=True)


def memory_child(store_path: Path) -> None:
    store = ProbabilityStore(store_path)
    generator = torch.Generator().manual_seed(0)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _, scores in store.iter_scores():
        select_pixels(scores, k=10, exclude=None, top_fraction=0.05, generator=generator)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak RSS {peak / 1024:.0f} MiB (+{(peak - start) / 1024:.1f} MiB while selecting)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="overhead,inference,select,memory")
    parser.add_argument("--camvid-root", default=os.environ.get("PIXELPICK_CAMVID_ROOT"))
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(Path(args.memory_child))
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        only = args.only.split(",")
        if "select" in only:
            bench_select(workdir)
        if "memory" in only:
            bench_memory(workdir)
        if "inference" in only:
            bench_inference(workdir, "lraspp_mobilenetv3", {}, None)
            if args.camvid_root:
                bench_inference(workdir, "deeplabv3plus_mobilenetv2",
                                {"data.dataset": "camvid", "data.root": args.camvid_root}, 48)
        if "overhead" in only:
            bench_overhead(workdir)


if __name__ == "__main__":
    main()
