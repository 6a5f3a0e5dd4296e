"""Data-parallel training with torch DDP on the CPU (gloo): two processes see every labelled image once per epoch,
hold the same weights after every step, and learn; a round with `train.processes: 2` trains through torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pixelpick.campaign import open_campaign
from pixelpick.checkpoints import read_checkpoint
from pixelpick.labels import read_labels
from pixelpick.recipe import STEPS, TRAIN_STEP, run_round, run_step
from tests.conftest import TINY_PARAMS

pytestmark = pytest.mark.slow


def started(folder, overrides=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(TINY_PARAMS)
    campaign = open_campaign(folder / "params.yaml", {"model.arch": "lraspp_mobilenetv3", **(overrides or {})})
    for step in ("query", "annotate", "ingest"):
        run_step(campaign, STEPS[step], 0)
    return campaign


def _train_rank(rank: int, world: int, campaign_dir: str, rendezvous: str, out: str) -> None:
    import pixelpick.training as training
    from pixelpick.campaign import open_recorded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        campaign = open_recorded(campaign_dir)
        seen: list[list[str]] = []
        real_getitem = training.LabelledImages.__getitem__

        def remember(self, index):
            while len(seen) <= self.epoch:
                seen.append([])
            seen[self.epoch].append(self.image_ids[index])
            return real_getitem(self, index)

        training.LabelledImages.__getitem__ = remember
        torch.manual_seed(0)
        model = TRAIN_STEP.prepare(campaign, 0).new_model()
        labels = read_labels(campaign.files(0).snapshot)
        result = training.fit(model, campaign.pool, labels, campaign.settings.train, torch.device("cpu"), seed=3)
        weights = {name: parameter.detach() for name, parameter in model.named_parameters()}
        torch.save({"weights": weights, "seen": seen, "history": result.history}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_share_the_images_and_the_weights_and_learn(tmp_path):
    campaign = started(tmp_path / "c", {"train.epochs": 3})
    mp.spawn(_train_rank, args=(2, str(campaign.layout.dir), str(tmp_path / "rendezvous"), str(tmp_path)),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # Every step averages the gradients, so both processes end with the same weights. (On the CPU each process
    # keeps BatchNorm statistics of its own share; process 0's are the ones saved.)
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key
    # Each epoch, the two shares are disjoint and together every labelled image, once.
    for epoch in range(3):
        shares = [set(rank["seen"][epoch]) for rank in ranks]
        assert not shares[0] & shares[1]
        assert shares[0] | shares[1] == set(read_labels(campaign.files(0).snapshot)["image_id"])
    losses = [epoch["loss"] for epoch in ranks[0]["history"]]
    assert losses[-1] < losses[0]


def test_a_round_with_two_processes_trains_through_torchrun(tmp_path):
    campaign = started(tmp_path / "c", {"train.processes": 2, "train.epochs": 2})
    run_round(campaign, 0)
    checkpoint = read_checkpoint(campaign.files(0).model)
    assert len(checkpoint["history"]) == 2 and not any(k.startswith("module.") for k in checkpoint["model"])
    record = json.loads(campaign.files(0).step_record("train").read_text())
    assert record["details"]["epochs"] == 2
    assert json.loads(campaign.files(0).metrics.read_text())["miou"] > 0


def test_the_train_step_under_torchrun_by_hand_trains_as_one_group(tmp_path):
    """What the README says to run on each of several machines, here as one machine's two processes."""
    campaign = started(tmp_path / "c", {"train.epochs": 2})
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "flows.cli",
         "step", "train", "--round", "0", "--campaign-dir", str(campaign.layout.dir)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(read_checkpoint(campaign.files(0).model)["history"]) == 2
    record = json.loads(campaign.files(0).step_record("train").read_text())  # written by process 0 alone
    assert record["details"]["epochs"] == 2 and record["details"]["device"] == "cpu"
