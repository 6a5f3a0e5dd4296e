"""The registered model's aliases: `round-NN` for every round's model as it is now, `best` for the highest measured
mIoU among those; both follow a model that is replaced or restored."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.tracking import _move_aliases

NAME = "pixelpick-aliases"


@pytest.fixture()
def client(tmp_path) -> MlflowClient:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model(NAME)
    return client


def new_round(client: MlflowClient, round_id: int, miou: float | None) -> str:
    """What a round leaves in MLflow: its run (with mIoU when it was measured) and a registered version."""
    experiment = client.get_experiment_by_name("rounds") or client.get_experiment(client.create_experiment("rounds"))
    run = client.create_run(experiment.experiment_id)
    if miou is not None:
        client.log_metric(run.info.run_id, "miou", miou, step=round_id)
    version = client.create_model_version(NAME, source=f"runs:/{run.info.run_id}/segmenter",
                                          run_id=run.info.run_id).version
    _move_aliases(client, NAME, str(version), round_id)
    return str(version)


def alias(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(NAME, name).version)
    except MlflowException:
        return None


def test_best_moves_only_to_a_measured_miou_that_beats_it(client: MlflowClient) -> None:
    history = []
    for round_id, miou in enumerate([0.40, None, 0.35, 0.52, 0.52, None, 0.61]):
        version = new_round(client, round_id, miou)
        assert alias(client, f"round-{round_id:02d}") == version  # every round is named
        history.append(alias(client, "best"))
    # v1 (0.40) holds through the unmeasured v2 and the worse v3; v4 (0.52) beats it, and the tie v5 does not;
    # the unmeasured v6 leaves it too, and v7 (0.61) beats it.
    assert history == ["1", "1", "1", "4", "4", "4", "7"]


def test_without_any_measured_miou_there_is_no_best(client: MlflowClient) -> None:
    for round_id in range(3):
        new_round(client, round_id, None)
    assert alias(client, "best") is None
    assert [alias(client, f"round-{r:02d}") for r in range(3)] == ["1", "2", "3"]


def test_rerunning_a_round_keeps_best(client: MlflowClient) -> None:
    version = new_round(client, 0, 0.5)
    _move_aliases(client, NAME, version, 0)  # a crashed round's retry logs the same version again
    assert alias(client, "best") == version


def test_aliases_follow_a_round_model_that_is_replaced_and_restored(tmp_path, monkeypatch) -> None:
    import json
    from types import SimpleNamespace

    import tasks.tracking as tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()

    def register(campaign, round_id, run_id, model_name, lineage):  # the model's version, without a pyfunc
        version = str(client.create_model_version(model_name, source=f"runs:/{run_id}/segmenter", run_id=run_id,
                                                  tags={"model": lineage["pixelpick.model"]}).version)
        return version

    monkeypatch.setattr(tracking, "_register", register)
    monkeypatch.setattr(tracking, "_log_round_data", lambda client, run_id, campaign, round_id, metrics:
                        client.log_metric(run_id, "miou", metrics["miou"]))
    monkeypatch.setattr(tracking, "git_commit", lambda: "abc")
    client.create_registered_model(tracking.registered_model_name("restored"))

    def files(round_id: int) -> SimpleNamespace:
        folder = tmp_path / f"r{round_id:02d}"
        return SimpleNamespace(model=folder / "model.pt", metrics=folder / "metrics.json",
                               snapshot=folder / "labels.parquet")

    campaign = SimpleNamespace(name="restored", files=files, recorded_settings=dict)

    def write_round(round_id: int, model: bytes, miou: float) -> None:
        paths = files(round_id)
        paths.model.parent.mkdir(exist_ok=True)
        paths.model.write_bytes(model)
        paths.snapshot.write_bytes(b"labels")
        paths.metrics.write_text(json.dumps({"miou": miou}))

    write_round(0, b"round 0", 0.30)
    write_round(1, b"round 1", 0.40)
    versions = [tracking.log_round(campaign, r) for r in (0, 1)]
    name = tracking.registered_model_name("restored")

    def alias_of(alias_name: str) -> str:
        return str(client.get_model_version_by_alias(name, alias_name).version)

    assert (alias_of("round-01"), alias_of("best")) == (versions[1], versions[1])

    original = files(1).model.read_bytes()
    write_round(1, b"round 1 from damaged data", 0.55)  # a round redone from damaged data: better on paper
    damaged = tracking.log_round(campaign, 1)
    assert damaged != versions[1] and (alias_of("round-01"), alias_of("best")) == (damaged, damaged)

    write_round(1, original, 0.40)  # the round's model restored: its version is found by the model's digest
    assert tracking.log_round(campaign, 1) == versions[1]
    assert (alias_of("round-01"), alias_of("best"), alias_of("round-00")) == (versions[1], versions[1], versions[0])
