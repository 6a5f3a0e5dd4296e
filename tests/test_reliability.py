"""A campaign under crashes, concurrency and signals, through the real command line: killed at any point it
re-runs to the same result; a second run of the same campaign is refused at once; SIGTERM stops a run within
seconds, cleanly; a killed run's temporary Prefect server does not outlive the next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import prefect_home_for
from tests.test_flows import scratch_repo

pytestmark = pytest.mark.slow

# Enough epochs that training takes a few seconds, with a resume point after each epoch.
LONGER = ("--set", "train.epochs=6", "--set", "train.checkpoint_every=1")


def start(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    return subprocess.Popen(["pixelpick", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(condition, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def round_files(repo: Path) -> dict[str, bytes]:
    rounds = repo / "data/runs/tiny/rounds"
    return {str(p.relative_to(rounds)): p.read_bytes() for p in sorted(rounds.glob("r*/*"))
            if p.name in ("queries.parquet", "annotations.parquet", "labels.parquet", "model.pt")}


class Killed(BaseException):
    """Stands for the process dying at that point (a BaseException, as a signal's, so no handler swallows it)."""


def test_killed_at_any_step_a_campaign_reruns_to_the_same_files(tmp_path, monkeypatch, reference_campaign):
    import pixelpick.recipe as recipe
    import pixelpick.training as training
    from pixelpick.campaign import open_campaign

    expected = round_files(reference_campaign)
    repo = scratch_repo(tmp_path / "repo")
    rounds = repo / "data/runs/tiny/rounds"
    resume_often = {"train.checkpoint_every": 1}  # runtime: a resume point after every epoch, same results

    def run_in_process_until(point: str, patch) -> None:
        with monkeypatch.context() as patched:
            patch(patched)
            with pytest.raises(Killed):
                recipe.run_campaign(open_campaign(repo / "params.yaml", resume_often))
        assert not (rounds / "r01/steps/evaluate.json").exists(), f"{point}: the campaign must not have finished"

    real_epoch = training.train_one_epoch

    def dies_in_second_epoch_of(round_dir: str):
        epochs = []

        def epoch(*args, **kwargs):
            if (rounds / round_dir / "train.resume.pt").exists():  # after its first resume point
                epochs.append(1)
                raise Killed()
            return real_epoch(*args, **kwargs)

        return lambda patched: patched.setattr(training, "train_one_epoch", epoch)

    # Three deaths simulated in-process: while round 0 trains (after its first resume point) ...
    run_in_process_until("r00 training", dies_in_second_epoch_of("r00"))
    assert (rounds / "r00/train.resume.pt").is_file() and not (rounds / "r00/model.pt").exists()

    # ... one real kill -9, while round 1 infers into Zarr (a store partly written by a dead process) ...
    process = start("campaign", "--plain", "--set", "train.checkpoint_every=1", cwd=repo)
    wait_for(lambda: (rounds / "r01/probs.zarr").exists() or process.poll() is not None, what="round 1's store")
    process.kill()
    process.wait()

    # ... right after round 1's snapshot is written, before its record is ...
    real_record = recipe.record_step

    def dies_recording_ingest(campaign, step, round_id, key, measured):
        if step.name == "ingest" and round_id == 1:
            raise Killed()
        return real_record(campaign, step, round_id, key, measured)

    run_in_process_until("r01 snapshot", lambda patched: patched.setattr(recipe, "record_step", dies_recording_ingest))
    assert (rounds / "r01/labels.parquet").is_file() and not (rounds / "r01/steps/ingest.json").exists()

    # ... and while round 1 trains.
    run_in_process_until("r01 training", dies_in_second_epoch_of("r01"))

    assert finish(start("campaign", "--plain", "--set", "train.checkpoint_every=1", cwd=repo))[0] == 0
    assert round_files(repo) == expected
    record = json.loads((rounds / "r01/steps/train.json").read_text())
    assert record["details"]["resumed_after_epoch"] >= 1  # the last death's training continued, it did not restart


def test_a_second_run_of_a_campaign_is_refused_and_sigterm_stops_the_first_within_seconds(tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    first = start("campaign", "--plain", *LONGER, cwd=repo)
    lock = repo / "data/runs/tiny/.lock"
    wait_for(lambda: lock.exists() and lock.read_text(), what="the campaign lock")

    second = finish(start("campaign", "--plain", *LONGER, cwd=repo), timeout=120)
    assert second[0] == 1
    assert f"already being run by pid {first.pid}" in second[2] and "Traceback" not in second[2]

    rounds = repo / "data/runs/tiny/rounds"
    wait_for(lambda: any(rounds.glob("r*/train.resume.pt")) or first.poll() is not None, what="training")
    assert first.poll() is None, first.communicate()
    training = next(rounds.glob("r*/train.resume.pt")).parent  # the round being trained
    stopped_at = time.monotonic()
    first.send_signal(signal.SIGTERM)
    code, _, err = finish(first, timeout=60)
    print(f"plain run stopped {time.monotonic() - stopped_at:.1f} s after SIGTERM")
    assert time.monotonic() - stopped_at < 15
    assert code == 130 and "stopped (SIGTERM)" in err and "Traceback" not in err

    # The lock went with the process: the campaign runs again, continuing its training.
    assert finish(start("campaign", "--plain", *LONGER, cwd=repo))[0] == 0
    record = json.loads((training / "steps/train.json").read_text())
    assert record["details"]["resumed_after_epoch"] >= 1


def _servers(prefect_home: str) -> list[int]:
    from tasks.servers import orphaned_servers

    wanted = {b"PREFECT__SERVER_EPHEMERAL=1", f"PREFECT_HOME={prefect_home}".encode()}
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and wanted <= set((entry / "environ").read_bytes().split(b"\0")):
                alive.append(int(entry.name))
        except OSError:
            continue
    assert set(orphaned_servers(prefect_home)) <= set(alive)
    return alive


def _temporary_server_environment(tmp_path: Path, database: Path) -> tuple[str, dict]:
    home = str(prefect_home_for(tmp_path / "prefect-home", database))
    return home, {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "PREFECT_HOME": home,
                  "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _flow_run_states(prefect_home: str) -> list[tuple[str, str]]:
    """Each flow run's name and state, read from the temporary server's database (no server needs to run)."""
    import sqlite3

    with sqlite3.connect(Path(prefect_home) / "prefect.db") as database:
        return sorted(database.execute("SELECT name, state_type FROM flow_run"))


def _campaign_run_statuses() -> list[str]:
    from mlflow import MlflowClient

    experiment = MlflowClient().get_experiment_by_name("tiny")
    runs = MlflowClient().search_runs([experiment.experiment_id], "tags.`pixelpick.kind` = 'campaign'")
    return [run.info.status for run in runs]


def _hear_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c", "group-sigterm", "sigterm"])
def test_a_signal_stops_a_prefect_campaign_within_seconds_and_its_temporary_server_with_it(tmp_path, signum, to_group,
                                                                                           migrated_prefect_database):
    # Ctrl-C and systemd/docker send the signal to the whole process group, the temporary server included; `kill`
    # sends it to the process alone.
    repo = scratch_repo(tmp_path / "repo")
    home, environment = _temporary_server_environment(tmp_path, migrated_prefect_database)
    # As in a terminal, where Ctrl-C is heard: a suite started in the background (`make test &`) inherits SIGINT
    # ignored, and Python then installs no handler for it.
    process = subprocess.Popen(["pixelpick", "campaign", *LONGER], cwd=repo, text=True, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               preexec_fn=_hear_ctrl_c)
    wait_for(lambda: (repo / "data/runs/tiny/rounds/r00/train.resume.pt").exists() or process.poll() is not None,
             what="training under Prefect")
    assert process.poll() is None, process.communicate()
    stopped_at = time.monotonic()
    if to_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    code, _, err = finish(process, timeout=300)
    took = time.monotonic() - stopped_at
    print(f"Prefect run stopped {took:.1f} s after {signum.name}{' to its group' * to_group}")
    stops = [line for line in err.splitlines() if line.startswith("stopped (")]
    assert code == 130 and took < 15, err
    assert stops == [f"stopped ({signum.name}): run the same command again to continue where it stopped"], err
    assert "Traceback" not in err and "ConnectError" not in err, err
    wait_for(lambda: not _servers(home), timeout=20, what="the temporary server to stop")
    assert _campaign_run_statuses() == ["KILLED"]
    states = dict(_flow_run_states(home))
    assert states["campaign"] in ("CRASHED", "CANCELLED") and "RUNNING" not in states.values(), states


def test_a_running_process_owns_its_flow_runs_after_the_clock_is_stepped(monkeypatch):
    """The kernel's boot time, from which psutil derives start times on the clock, moves when the clock is stepped:
    a live process must not then look gone, or the next command would mark its running flow runs Crashed."""
    import psutil

    from tasks.servers import _owner_gone, owner_tag

    tag = owner_tag()
    boot_time = psutil._psplatform.boot_time
    monkeypatch.setattr(psutil._psplatform, "boot_time", lambda: boot_time() + 1.0)  # the clock, a second on
    assert not _owner_gone(tag)
    assert _owner_gone(f"{tag.rsplit(':', 1)[0]}:0.01")  # the same pid, started at another time: a reused pid
    assert _owner_gone(f"{tag.rsplit(':', 2)[0]}:{2**22 + 1}:0.01")  # no such process


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_a_killed_flows_server_is_stopped_and_its_flow_runs_marked_crashed_by_the_next_commands(
        tmp_path, migrated_prefect_database):
    repo = scratch_repo(tmp_path / "repo")
    home, environment = _temporary_server_environment(tmp_path, migrated_prefect_database)
    # Its output goes to a file: a pipe nobody reads while it runs could fill and stop it.
    with (tmp_path / "campaign.log").open("w") as log:
        process = subprocess.Popen(["pixelpick", "campaign", *LONGER], cwd=repo, text=True, env=environment,
                                   stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: (repo / "data/runs/tiny/rounds/r00/train.resume.pt").exists() or process.poll() is not None,
             what="training under Prefect")
    process.kill()
    process.wait()
    output = (tmp_path / "campaign.log").read_text()[-3000:]
    assert process.returncode == -signal.SIGKILL, output  # killed while training, not ended on its own
    orphans = _servers(home)
    assert orphans, output
    assert _flow_run_states(home) == [("campaign", "RUNNING"), ("round-00", "RUNNING")], output

    # Any command stops the orphaned server, one that runs no flow too.
    subprocess.run(["pixelpick", "pipeline", *LONGER], cwd=repo, env=environment, check=True, capture_output=True)
    wait_for(lambda: not set(orphans) & set(_servers(home)), timeout=20, what="the orphan to stop")

    # The next flow command marks the killed process's flow runs crashed.
    done = subprocess.run(["pixelpick", "round", "0", *LONGER], cwd=repo, env=environment, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert _flow_run_states(home) == [("campaign", "CRASHED"), ("round-00", "COMPLETED"), ("round-00", "CRASHED")]
