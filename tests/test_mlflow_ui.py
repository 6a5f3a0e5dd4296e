"""The MLflow UI, opened as README's "browse it" steps say, shows the campaign's runs and its registered model.

MLflow 3.17's UI picks GenAI or "Model training" from a browser-wide setting (default GenAI, kept in local storage),
not from the experiment's `mlflow.experimentKind` tag (its bundle reads the tag only behind a feature flag that is
always on), so a fresh browser lands on an empty GenAI overview until "Model training" is clicked once. The test
uses a fresh browser profile for that reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from tasks.tracking import _move_aliases, experiment_id_for, registered_model_name
from tests.test_annotator_browser import CHROMIUM, CHROMIUM_ARGS
from tests.tools import stop_process_group, wait_until_serving

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CAMPAIGN = "tiny-margin"


def log_campaign(client: MlflowClient) -> str:
    """What a two-round campaign leaves in MLflow: the parent run, a nested run per round, a version per round."""
    experiment = experiment_id_for(client, CAMPAIGN)
    parent = client.create_run(experiment, run_name=CAMPAIGN, tags={"pixelpick.kind": "campaign"}).info.run_id
    name = registered_model_name(CAMPAIGN)
    client.create_registered_model(name)
    for round_id, miou in enumerate([0.41, 0.52]):
        run = client.create_run(experiment, run_name=f"round-{round_id:02d}",
                                tags={"mlflow.parentRunId": parent, "pixelpick.round": str(round_id)}).info.run_id
        client.log_metric(run, "miou", miou, step=round_id)
        client.set_terminated(run)
        version = client.create_model_version(name, source=f"runs:/{run}/segmenter", run_id=run).version
        _move_aliases(client, name, str(version), round_id)
    client.set_terminated(parent)
    return experiment


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory) -> Iterator[tuple[str, str]]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    home = tmp_path_factory.mktemp("mlflow-ui")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    experiment = log_campaign(MlflowClient(tracking_uri=uri, registry_uri=uri))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (home / "server.log").open("w")
    process = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # as the README says
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200,
                           timeout=120, log=home / "server.log", what="mlflow server")
        yield url, experiment
    finally:
        stop_process_group(process, log, timeout=10)  # the server and its uvicorn worker


@pytest.fixture()
def page(tmp_path):
    """A page of a browser with a fresh profile: no workflow choice remembered from an earlier visit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=CHROMIUM, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})
        yield context.pages[0] if context.pages else context.new_page()
        context.close()


def test_the_experiment_opens_on_the_campaign_run_and_its_rounds(mlflow_ui, page, tmp_path) -> None:
    url, experiment = mlflow_ui
    # README's steps: "Model training" once (the browser remembers it), then the experiment.
    page.goto(f"{url}/")
    page.get_by_text("Model training", exact=True).click()
    page.goto(f"{url}/#/experiments")
    page.locator(f"a[href='#/experiments/{experiment}']").first.click()
    page.get_by_text("3 matching runs").wait_for(timeout=60_000)
    parent = page.locator("a[href*='/runs/']", has_text=CAMPAIGN)
    parent.wait_for()
    page.screenshot(path=tmp_path / "runs.png")
    # The rounds are nested under the campaign's run: one click on its expander shows them.
    page.locator("[role=row]", has=parent).get_by_role("button").first.click()
    for round_id in (0, 1):
        page.locator("a[href*='/runs/']", has_text=f"round-{round_id:02d}").wait_for(timeout=30_000)
    page.screenshot(path=tmp_path / "rounds.png")
    assert "GenAI" not in page.url and "overview" not in page.url


def test_the_registered_model_page_shows_versions_and_aliases(mlflow_ui, page, tmp_path) -> None:
    url, _ = mlflow_ui
    page.goto(f"{url}/#/models/{registered_model_name(CAMPAIGN)}")
    page.get_by_role("link", name="Version 2", exact=True).wait_for(timeout=60_000)
    page.screenshot(path=tmp_path / "model.png")
    text = page.inner_text("body")
    assert "Version 1" in text and "Version 2" in text
    for alias in ("best", "round-00", "round-01"):
        assert alias in text
