"""A round's query in shards on a Dask cluster of worker processes: the same queries and store as one process,
one writer per chunk, and a worker killed mid-round costs nothing but time."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest

from flows.parameters import CampaignChoice, ClusterChoice
from flows.round import on_cluster
from pixelpick.campaign import open_campaign
from pixelpick.probstore import ProbabilityStore, ProbabilityWriter, create_store
from pixelpick.recipe import QUERY, STEPS, run_round, run_step
from pixelpick.steps import plan_query
from tests.conftest import TINY_PARAMS

pytestmark = pytest.mark.slow

# Enough images that a shard takes a moment, so a worker can be caught holding one. DeepLabv3+: the tiny LR-ASPP
# stays near chance, and near-tied scores would let float rounding (a worker's thread count) reorder the picks.
PARAMS = TINY_PARAMS.replace("num_train: 24", "num_train: 64").replace("arch: lraspp_mobilenetv3",
                                                                         "arch: deeplabv3plus_mobilenetv2")


@pytest.fixture(scope="module")
def round_zero(tmp_path_factory):
    """A campaign whose round 0 is done, trained once for the module: copy it before changing anything in it."""
    folder = tmp_path_factory.mktemp("round-zero")
    (folder / "params.yaml").write_text(PARAMS)
    run_round(open_campaign(folder / "params.yaml", {"campaign.name": "sharded"}), 0)
    return folder


def started_campaign(round_zero, folder):
    """A copy of `round_zero` (a campaign's records hold no paths, so a copy is as fresh as the original)."""
    shutil.copytree(round_zero, folder, dirs_exist_ok=True)
    return open_campaign(folder / "params.yaml", {"campaign.name": "sharded"})


@pytest.fixture(scope="module")
def reference(round_zero, tmp_path_factory):
    """Round 1's query in one process."""
    campaign = started_campaign(round_zero, tmp_path_factory.mktemp("reference"))
    run_step(campaign, STEPS["query"], 1)
    return campaign


def assert_same_query(campaign, reference):
    """The same pixels in the same order. Scores and probabilities agree to float rounding only: a worker runs
    torch on one thread, and the convolutions' summation order depends on the thread count."""
    ours, theirs = pd.read_parquet(campaign.files(1).queries), pd.read_parquet(reference.files(1).queries)
    pd.testing.assert_frame_equal(ours.drop(columns="score"), theirs.drop(columns="score"))
    np.testing.assert_allclose(ours["score"], theirs["score"], rtol=1e-4, atol=1e-5)
    ours, theirs = ProbabilityStore(campaign.files(1).probs), ProbabilityStore(reference.files(1).probs)
    assert ours.image_ids == theirs.image_ids
    for image_id in theirs.image_ids:
        np.testing.assert_allclose(ours.scores(image_id), theirs.scores(image_id), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(ours.probs(image_id), theirs.probs(image_id), rtol=1e-3, atol=1e-3)


def test_shards_are_whole_batches_and_never_share_a_chunk(reference):
    plan, _ = plan_query(QUERY.prepare(reference, 1), shards=5)
    images = [image_id for shard in plan.shards for _, ids in shard for image_id in ids]
    assert sorted(images) == sorted(reference.pool.image_ids) and len(images) == len(set(images))
    assert len(plan.shards) == 5
    # A writer of one shard refuses another shard's image: two writers never touch one chunk.
    create_store(reference.layout.dir / "scratch.zarr", {"a": (2, 2), "b": (2, 2)}, 2, "margin")
    with pytest.raises(KeyError, match="another shard"):
        with ProbabilityWriter(reference.layout.dir / "scratch.zarr", images=["a"]) as writer:
            writer.write("b", np.full((2, 2, 2), 0.5), np.zeros((2, 2)))


def test_two_worker_processes_query_exactly_what_one_process_does(prefect_server, tmp_path, round_zero,
                                                                 reference):
    campaign = started_campaign(round_zero, tmp_path)
    cluster = ClusterChoice(workers=2, shards=4)
    choice = CampaignChoice(params=str(tmp_path / "params.yaml"), overrides={"campaign.name": "sharded"})
    thread_limits = {key: value for key, value in os.environ.items() if key.endswith("_NUM_THREADS")}
    on_cluster(cluster)(choice, 1, cluster)
    assert_same_query(campaign, reference)
    # The workers' thread limits stay theirs: the flow's later subprocesses (DVC stages, torchrun) keep all cores.
    assert {key: value for key, value in os.environ.items() if key.endswith("_NUM_THREADS")} == thread_limits


def test_a_worker_killed_mid_round_is_replaced_and_the_round_ends_the_same(prefect_server, tmp_path, round_zero,
                                                                         reference):
    from dask.distributed import Client, LocalCluster

    campaign = started_campaign(round_zero, tmp_path)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as dask_cluster, \
            Client(dask_cluster) as client:
        killed = []
        pids = client.run(os.getpid)  # worker address -> its process

        def kill_a_worker_holding_a_shard():
            deadline = time.monotonic() + 120
            while not killed and time.monotonic() < deadline:
                for address, keys in client.processing().items():
                    if any("query-shard" in str(key) or "run_shard" in str(key) for key in keys):
                        os.kill(pids[address], signal.SIGKILL)
                        killed.append(address)
                        return
                time.sleep(0.01)

        watcher = threading.Thread(target=kill_a_worker_holding_a_shard)
        watcher.start()
        cluster = ClusterChoice(address=dask_cluster.scheduler_address, shards=8)
        choice = CampaignChoice(params=str(tmp_path / "params.yaml"), overrides={"campaign.name": "sharded"})
        on_cluster(cluster)(choice, 1, cluster)
        watcher.join()
    assert killed, "no worker was caught holding a shard"
    assert_same_query(campaign, reference)
