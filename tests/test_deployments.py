"""Served deployments against a real Prefect server (`prefect server start`), the way a scheduled campaign runs:
`pixelpick ... --serve` in one process, runs triggered by its schedule and by `prefect deployment run`, each
flow run in a subprocess that loads the flow from its file. A direct flow call does not go through that path."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import prefect_home_for
from tests.test_flows import scratch_repo

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory, migrated_prefect_database):
    """A real Prefect server for this module, on its own database; yields the environment that talks to it."""
    home = prefect_home_for(tmp_path_factory.mktemp("prefect-server"), migrated_prefect_database)
    port = free_port()
    # The served process checks for due runs every second rather than every 10 (Prefect's default), so that runs
    # start as soon as they are due.
    env = {**os.environ, "PREFECT_HOME": str(home), "OMP_NUM_THREADS": "1",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("the Prefect server did not start in 120 s")
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def serve(env: dict, repo: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "pixelpick"), *args, "--serve"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop(process: subprocess.Popen) -> str:
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    return output


def deployment_runs(env: dict, deployment: str) -> list[dict]:
    """The deployment's flow runs, oldest first, as the API reports them."""
    api = env["PREFECT_API_URL"]
    found = httpx.get(f"{api}/deployments/name/{deployment}", timeout=10).json()
    runs = httpx.post(f"{api}/flow_runs/filter", timeout=10,
                      json={"deployments": {"id": {"any_": [found["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}).json()
    return runs


def wait_for_deployment(env: dict, deployment: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"--serve exited:\n{process.stdout.read()}")
        if httpx.get(f"{env['PREFECT_API_URL']}/deployments/name/{deployment}", timeout=10).status_code == 200:
            return
        time.sleep(1)
    pytest.fail(f"deployment {deployment} never appeared")


def deployment_run(env: dict, repo: Path, deployment: str, *params: str) -> str:
    """`prefect deployment run NAME --param ... --watch`; returns the final state's name."""
    done = subprocess.run([str(BIN / "prefect"), "deployment", "run", deployment, *params, "--watch",
                           "--watch-interval", "1", "--watch-timeout", "400"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=450)
    final = [line for line in done.stdout.splitlines() if "Flow run finished" in line]
    assert final, f"no final state:\n{done.stdout}\n{done.stderr}"
    return final[-1]


def test_a_served_campaign_runs_by_hand_with_changed_parameters_and_on_its_schedule(prefect_api, tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    deployment = "pixelpick-campaign/campaign-served"
    server = serve(prefect_api, repo, "campaign", "--campaign", "served", "--interval", "20")
    try:
        wait_for_deployment(prefect_api, deployment, server)

        # A manual run with the deployment's defaults (the form's values), then one with a changed parameter.
        assert "Completed" in deployment_run(prefect_api, repo, deployment)
        changed = {"params": str(repo / "params.yaml"), "overrides": {"campaign.name": "served",
                                                                      "campaign.rounds": 2}}
        assert "Completed" in deployment_run(prefect_api, repo, deployment, "--param",
                                             f"campaign={json.dumps(changed)}")
        assert (repo / "data/runs/served/rounds/r02/model.pt").is_file()

        # The schedule: at least two scheduled runs end Completed (with every round done, they find no work).
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            scheduled = [r for r in deployment_runs(prefect_api, deployment) if r["auto_scheduled"]
                         and r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
            if len(scheduled) >= 2:
                break
            time.sleep(5)
        assert [r["state_type"] for r in scheduled][:2] == ["COMPLETED", "COMPLETED"], scheduled
    finally:
        output = stop(server)
    assert "Validation of flow parameters failed" not in output


def test_a_served_human_train_flow_says_it_is_waiting(prefect_api, tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    human = ["--campaign", "people", "--set", "campaign.annotator=human"]
    done = subprocess.run([str(BIN / "pixelpick"), "human", "query", "0", *human], cwd=repo, env=prefect_api,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    deployment = "pixelpick-human-train/train-people-r00"
    server = serve(prefect_api, repo, "human", "train", "0", "--campaign", "people", "--interval", "3600")
    try:
        wait_for_deployment(prefect_api, deployment, server)
        assert "Completed" in deployment_run(prefect_api, repo, deployment, "--param", "round_id=0")
    finally:
        output = stop(server)
    assert "waiting: 0 of 240 pixels labelled in round 0's job" in output
