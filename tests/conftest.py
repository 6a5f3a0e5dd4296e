"""Shared test set-up: every store in a temporary folder, telemetry off, one Prefect server per session."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Set before Prefect or MLflow is imported anywhere: both read their settings at import.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="pixelpick-tests-"))
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)  # tests leave nothing behind
os.environ.setdefault("PREFECT_HOME", str(_SESSION_DIR / "prefect"))
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlflow.db'}"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
# Under pytest-xdist each worker gets its share of the cores: torch's default pool (a thread per core) in every
# worker, and in every process a test starts, would oversubscribe them and make the run slower than a serial one.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _limit in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_limit, _threads)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    """The real CamVid, when PIXELPICK_CAMVID_ROOT points at it; tests using it skip otherwise."""
    root = os.environ.get("PIXELPICK_CAMVID_ROOT")
    if not root or not (Path(root) / "train").is_dir():
        pytest.skip("real CamVid not available (set PIXELPICK_CAMVID_ROOT)")
    return Path(root)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the whole session (starting one takes about 10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def migrated_prefect_database(tmp_path_factory) -> Path:
    """A Prefect database already at the current schema, made once for all xdist workers: a test's own Prefect
    server starts from a copy in seconds (`prefect_home_for`), where migrating a new database takes about 20."""
    import prefect
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the same folder for every worker of this run
    database = shared / f"prefect-{prefect.__version__}.db"
    with FileLock(shared / "prefect-database.lock"):
        if not database.is_file():
            home = Path(tempfile.mkdtemp(dir=shared))
            environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
            subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"],
                           env={**environment, "PREFECT_HOME": str(home)}, check=True, capture_output=True)
            (home / "prefect.db").replace(database)  # whole, or not there: a run killed meanwhile leaves none
            shutil.rmtree(home)
    return database


def prefect_home_for(folder: Path, database: Path) -> Path:
    """`folder` as a PREFECT_HOME holding a copy of the migrated `database`."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(database, folder / "prefect.db")
    return folder


@pytest.fixture
def tiny_settings(tmp_path):
    """A campaign small enough for a test: a few tiny synthetic scenes (generated), two short rounds."""
    from pixelpick.campaign import prepare_data
    from pixelpick.settings import load_settings

    params = tmp_path / "params.yaml"
    params.write_text(TINY_PARAMS)
    settings = load_settings(params)
    prepare_data(settings)
    return settings


@pytest.fixture(scope="session")
def reference_campaign(tmp_path_factory) -> Path:
    """The tiny campaign (TINY_PARAMS) run once, uninterrupted, with the plain loop: the files every crash and
    resume test must end with. Its folder is shared by the session: copy it before changing anything in it."""
    from pixelpick.campaign import open_campaign
    from pixelpick.recipe import run_campaign

    folder = tmp_path_factory.mktemp("reference")
    (folder / "params.yaml").write_text(TINY_PARAMS)
    # A resume point after every epoch, as crash tests run: a runtime setting, but checkpoints record it.
    run_campaign(open_campaign(folder / "params.yaml", {"train.checkpoint_every": 1}))
    return folder


# The default architecture (params.yaml), the fastest; DeepLabv3+ runs where a test needs it to learn in 2 epochs.
TINY_PARAMS = """
data:
  dataset: synthetic
  root: data/synthetic
  synthetic: {num_train: 24, num_val: 12, height: 48, width: 64, seed: 0}
model:
  arch: lraspp_mobilenetv3
train:
  preset: cpu-synthetic
  epochs: 2
  batch_size: 8
acquire:
  strategy: margin
  pixels_per_image: 10
campaign:
  name: tiny
  workdir: data/runs
  initial_pixels_per_image: 10
  rounds: 1
  error_rate: 0.0
  seed: 0
"""
