"""The registered model's aliases: `round-NN` for every round, `best` only for a measured mIoU that beats the best."""

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
    _move_aliases(client, NAME, str(version), round_id, miou)
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
    _move_aliases(client, NAME, version, 0, 0.5)  # a crashed round's retry logs the same version again
    assert alias(client, "best") == version
