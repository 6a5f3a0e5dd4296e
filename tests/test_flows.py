"""The round and campaign flows under a real (ephemeral) Prefect server, with MLflow on a SQLite file."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow import MlflowClient

from flows.campaign import run_campaign
from pixelpick.campaign import Campaign
from pixelpick.labels import read_labels
from pixelpick.settings import load_settings
from tasks.tracking import registered_model_name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def make_settings(folder, name):
    from tests.conftest import TINY_PARAMS

    (folder / "params.yaml").write_text(TINY_PARAMS.replace("name: tiny", f"name: {name}"))
    return load_settings(folder / "params.yaml")


def test_campaign_flow_registers_a_version_per_round_with_lineage(prefect_server, tmp_path):
    settings = make_settings(tmp_path, "flow-lineage")
    results = run_campaign(settings)
    assert [r["round"] for r in results] == [0, 1]

    client = MlflowClient()
    name = registered_model_name("flow-lineage")
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert [v.tags["round"] for v in versions] == ["0", "1"]
    campaign = Campaign(settings)
    for version in versions:
        paths = campaign.paths(int(version.tags["round"]))
        from tasks.common import file_md5

        assert version.tags["snapshot_md5"] == file_md5(paths.snapshot)
        assert version.tags["git_commit"]
    assert versions[0].tags["queries_from_model_version"] == "random"
    assert versions[1].tags["queries_from_model_version"] == str(versions[0].version)
    assert client.get_model_version_by_alias(name, "round-01").version == versions[-1].version
    best = client.get_model_version_by_alias(name, "best")
    assert float(client.get_run(best.run_id).data.metrics["miou"]) == max(r["miou"] for r in results)

    # Round runs are nested under the campaign's run and carry this round's own query statistics.
    run = client.get_run(versions[1].run_id)
    assert run.data.tags["mlflow.parentRunId"]
    assert run.data.metrics["query_queried_pixels"] == 10 * len(campaign.pool)

    # Running the campaign again hits every cache: same snapshots, no new versions or runs.
    snapshots = [campaign.paths(r).snapshot.read_bytes() for r in (0, 1)]
    again = run_campaign(settings)
    assert [r["model_version"] for r in again] == [r["model_version"] for r in results] == ["1", "2"]
    assert [campaign.paths(r).snapshot.read_bytes() for r in (0, 1)] == snapshots
    assert len(client.search_model_versions(f"name = '{name}'")) == 2


class Killed(Exception):
    """Stands for the process dying at that point."""


def test_a_round_killed_between_tasks_and_inside_ingest_reruns_to_the_same_snapshot(
    prefect_server, tmp_path, monkeypatch
):
    import pixelpick.labels as labels_module

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reference = make_settings(tmp_path / "a", "flow-reference")
    expected = [r["labels_digest"] for r in run_campaign(reference)]
    settings = make_settings(tmp_path / "b", "flow-crash")

    def die(*args, **kwargs):
        raise Killed()

    with monkeypatch.context() as patch:  # round 0 dies after ingest, before training
        patch.setattr(Campaign, "train", die)
        with pytest.raises(Killed):
            run_campaign(settings)

    real_write = labels_module._write_atomic

    def die_writing_round_1(labels, path):
        if "r01" in str(path):
            raise Killed()
        real_write(labels, path)

    with monkeypatch.context() as patch:  # round 1 dies inside ingest, in the middle of the write
        patch.setattr(labels_module, "_write_atomic", die_writing_round_1)
        with pytest.raises(Killed):
            run_campaign(settings)

    results = run_campaign(settings)
    assert [r["labels_digest"] for r in results] == expected
    campaign = Campaign(settings)
    final = read_labels(campaign.paths(1).snapshot)
    assert not final.duplicated(["image_id", "y", "x"]).any()
    assert len(final) == 20 * len(campaign.pool)
