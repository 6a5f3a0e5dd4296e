"""The team set-up of docs/team-servers.md, end to end: MLflow's tracking server and the Prefect server keep their
state in PostgreSQL, MLflow's artifacts go to a shared artifact root, and DVC pushes the label snapshots to a shared
remote. A throwaway PostgreSQL cluster, both servers and a tiny `pixelpick campaign` run here, and everything is
stopped and removed at the end, also when an assertion fails.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import yaml

from tests.team_servers import (
    VENV_BIN,
    mlflow_server,
    port_open,
    postgres_bindir,
    postgres_cluster,
    prefect_server,
    processes_in_group,
    processes_mentioning,
    stop_group,
    tail,
)

pytestmark = pytest.mark.slow

CAMPAIGN = "tiny-team"
ROUNDS = 1  # TINY_PARAMS: round 0 (random pixels) and round 1


def run(*command: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env or client_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def client_env(**extra: str) -> dict[str, str]:
    """A machine of the team: the environment's programs first, its own stores unset (the test session's SQLite
    MLflow and Prefect home are not this machine's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1", DO_NOT_TRACK="1",
               MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(extra)
    return env


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def dvc_object(remote: Path, digest: str) -> Path:
    """Where a DVC 3 cache or remote keeps the object with md5 `digest`."""
    return remote / "files" / "md5" / digest[:2] / digest[2:]


def make_scratch_repository(repo: Path) -> None:
    from tests.conftest import TINY_PARAMS

    repo.mkdir()
    (repo / "params.yaml").write_text(TINY_PARAMS.replace("name: tiny", f"name: {CAMPAIGN}"))
    run("git", "init", "-q", cwd=repo)
    run("dvc", "init", "-q", cwd=repo)


@pytest.fixture(scope="module")
def postgres_programs() -> Path:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's server programs (initdb, postgres) are not installed: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="MLflow's PostgreSQL driver is missing: pip install psycopg2-binary")
    pytest.importorskip("asyncpg", reason="Prefect's PostgreSQL driver is missing: pip install asyncpg")
    return bindir


def test_a_campaign_on_postgres_backed_servers_shares_models_runs_and_snapshots(postgres_programs, tmp_path):
    started = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        now = time.monotonic()
        phases[name] = now - since
        return now

    shared = tmp_path / "shared"  # stands for a shared disk every machine mounts at the same path
    artifact_root, dvc_remote = shared / "mlartifacts", shared / "dvc-remote"
    artifact_root.mkdir(parents=True)
    repo = tmp_path / "repo"
    groups: list[int] = []
    ports: list[int] = []
    cluster_folder = None
    try:
        with ExitStack() as stack:
            t = time.monotonic()
            cluster = stack.enter_context(postgres_cluster(postgres_programs))
            cluster_folder = cluster.folder
            groups.append(cluster.process.pid)
            ports.append(cluster.port)
            mlflow_db = cluster.create_database("mlflow")
            prefect_db = cluster.create_database("prefect", extensions=("pg_trgm",))
            t = phase("postgres", t)

            # Both start at once; each is stopped on the way out even if the other never answers.
            mlflow = stack.enter_context(mlflow_server(mlflow_db, artifact_root, tmp_path, wait=False))
            prefect = stack.enter_context(prefect_server(prefect_db, tmp_path / "prefect-server-home", tmp_path,
                                                         wait=False))
            groups += [mlflow.process.pid, prefect.process.pid]
            ports += [mlflow.port, prefect.port]
            mlflow.wait(), prefect.wait()
            t = phase("servers", t)

            # A machine of the team: a git + DVC repository, pointed at the servers by two variables.
            make_scratch_repository(repo)
            env = client_env(MLFLOW_TRACKING_URI=mlflow.url, PREFECT_API_URL=f"{prefect.url}/api",
                             PREFECT_HOME=str(tmp_path / "client-prefect-home"))
            campaign = subprocess.Popen([str(VENV_BIN / "pixelpick"), "campaign"], cwd=repo, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            groups.append(campaign.pid)
            try:
                output, _ = campaign.communicate(timeout=900)
            finally:
                stop_group(campaign)  # after a timeout or an error here: the campaign and anything it started
            assert campaign.returncode == 0, (
                f"pixelpick campaign failed ({campaign.returncode}):\n{output[-8000:]}\n"
                f"--- mlflow server ---\n{tail(mlflow.log)}\n--- prefect server ---\n{tail(prefect.log)}")
            t = phase("campaign", t)

            check_prefect(prefect.url, prefect_db)
            check_mlflow(mlflow.url, mlflow_db, artifact_root, repo)
            t = phase("checks", t)

            assert "up to date" in run("dvc", "status", cwd=repo, env=env)
            check_dvc_remote(repo, dvc_remote, env)
            t = phase("dvc", t)
        t = phase("teardown", t)

        # Nothing outlives the test: no process of any server's group, no listening port, no cluster folder.
        assert {pgid: processes_in_group(pgid) for pgid in groups} == {pgid: [] for pgid in groups}
        assert [p for p in ports if port_open(p)] == []
        assert [pid for p in ports[1:] for pid in processes_mentioning(f"--port {p}")] == []
        assert processes_mentioning(str(cluster_folder)) == []
        assert not cluster_folder.exists()
    finally:
        total = time.monotonic() - started
        print(f"\nteam servers test: {total:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + ")")


def check_prefect(url: str, database) -> None:
    """The Prefect server recorded the campaign's flow run and one subflow run per round, all completed."""
    api = f"{url}/api"

    def flow_runs(flow_name: str) -> list[dict]:
        response = httpx.post(f"{api}/flow_runs/filter", json={"flows": {"name": {"any_": [flow_name]}}}, timeout=30)
        response.raise_for_status()
        return response.json()

    (campaign,) = flow_runs("pixelpick-campaign")
    assert campaign["state_type"] == "COMPLETED"
    rounds = sorted(flow_runs("pixelpick-round"), key=lambda r: r["name"])
    assert [r["name"] for r in rounds] == [f"round-{r:02d}" for r in range(ROUNDS + 1)]
    assert {r["state_type"] for r in rounds} == {"COMPLETED"}
    # Each round ran inside the campaign's flow run.
    parents = httpx.post(f"{api}/task_runs/filter", timeout=30, json={
        "task_runs": {"id": {"any_": [r["parent_task_run_id"] for r in rounds]}}}).json()
    assert [p["flow_run_id"] for p in parents] == [campaign["id"]] * len(rounds)
    # The round's tasks ran and were recorded, e.g. the DVC commit of each round.
    tasks = httpx.post(f"{api}/task_runs/filter", timeout=30, json={
        "flow_runs": {"id": {"any_": [r["id"] for r in rounds]}}}).json()
    names = {t["name"] for t in tasks}
    assert {f"version-r{r:02d}" for r in range(ROUNDS + 1)} <= names
    assert {f"train-r{r:02d}" for r in range(ROUNDS + 1)} <= names

    # That state is in PostgreSQL.
    with database.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT f.name, r.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id "
                       "WHERE f.name IN ('pixelpick-campaign', 'pixelpick-round') ORDER BY r.name")
        assert cursor.fetchall() == sorted([("pixelpick-campaign", "campaign", "COMPLETED")] + [
            ("pixelpick-round", f"round-{r:02d}", "COMPLETED") for r in range(ROUNDS + 1)], key=lambda row: row[1])
        cursor.execute("SELECT extname FROM pg_extension WHERE extname = 'pg_trgm'")
        assert cursor.fetchall() == [("pg_trgm",)]


def check_mlflow(url: str, database, artifact_root: Path, repo: Path) -> None:
    """One registered version per round, its model's files under the shared artifact root, the data in PostgreSQL."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    name = f"pixelpick-{CAMPAIGN}"
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert [v.tags["round"] for v in versions] == [str(r) for r in range(ROUNDS + 1)]
    assert client.get_model_version_by_alias(name, f"round-{ROUNDS:02d}").version == versions[-1].version

    experiment = client.get_experiment_by_name(CAMPAIGN)
    # The server chose the location: its proxied artifact store, not a folder on the client.
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    for version in versions:
        assert version.source.startswith("models:/")  # a logged model, registered by its id
        model = client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))
        assert model.artifact_location.startswith("mlflow-artifacts:")
        relative = model.artifact_location.removeprefix("mlflow-artifacts:").lstrip("/")
        folder = artifact_root / relative
        assert (folder / "MLmodel").is_file(), f"no MLmodel in {folder}"
        (checkpoint,) = folder.rglob("model.pt")
        round_model = repo / "data" / "runs" / CAMPAIGN / "rounds" / f"r{int(version.tags['round']):02d}" / "model.pt"
        assert md5(checkpoint) == md5(round_model) == version.tags["model"]
        run_folder = artifact_root / experiment.experiment_id / version.run_id / "artifacts"
        assert (run_folder / "metrics.json").is_file()
    # Nothing of MLflow's landed on the client machine.
    assert not [p for p in repo.rglob("*") if p.name in {"MLmodel", "mlruns", "mlartifacts", "mlflow.db"}]

    with database.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT r.name, r.status FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
                       "WHERE e.name = %s ORDER BY r.name", (CAMPAIGN,))
        assert cursor.fetchall() == sorted([(CAMPAIGN, "FINISHED")] + [
            (f"round-{r:02d}", "FINISHED") for r in range(ROUNDS + 1)])
        cursor.execute("SELECT version, run_id, storage_location FROM model_versions WHERE name = %s "
                       "ORDER BY version", (name,))
        stored = cursor.fetchall()
        assert [(version, run_id) for version, run_id, _ in stored] == [(int(v.version), v.run_id) for v in versions]
        assert all(location.startswith("mlflow-artifacts:") for _, _, location in stored)


def check_dvc_remote(repo: Path, remote: Path, env: dict[str, str]) -> None:
    """`dvc push` to a shared remote holds every round's label snapshot, and a machine without them pulls them."""
    campaign = repo / "data" / "runs" / CAMPAIGN
    lock = yaml.safe_load((campaign / "dvc.lock").read_text())
    snapshots = {}
    for r in range(ROUNDS + 1):
        path = f"rounds/r{r:02d}/labels.parquet"
        (out,) = [o for stage in lock["stages"].values() for o in stage.get("outs", []) if o["path"] == path]
        snapshots[campaign / path] = out["md5"]
        assert md5(campaign / path) == out["md5"]

    run("dvc", "remote", "add", "-d", "shared", str(remote), cwd=repo, env=env)
    run("dvc", "push", cwd=repo, env=env)
    for path, digest in snapshots.items():
        assert md5(dvc_object(remote, digest)) == digest, f"{path} is not in the remote"
    assert "in sync" in run("dvc", "status", "--cloud", cwd=repo, env=env)

    # Another machine: a clone of the repository once the campaign's pipeline files and the remote's configuration
    # are committed has neither the snapshots nor a cache; `dvc pull` brings them from the remote.
    folder = campaign.relative_to(repo)
    git = ("git", "-c", "user.name=PixelPick test", "-c", "user.email=test@pixelpick.invalid",
           "-c", "commit.gpgsign=false")
    run("git", "add", ".dvc/config", *(str(folder / name) for name in ("dvc.yaml", "dvc.lock", "params.yaml",
                                                                  "pipeline-rounds.yaml", "step-settings.yaml")),
        cwd=repo, env=env)
    run(*git, "commit", "-q", "-m", "campaign", cwd=repo, env=env)
    other = repo.parent / "other-machine"
    run("git", "clone", "-q", str(repo), str(other), cwd=repo.parent, env=env)
    assert not (other / folder / "rounds").exists()
    run("dvc", "pull", cwd=other, env=env)
    assert {path: md5(other / path.relative_to(repo)) for path in snapshots} == snapshots
