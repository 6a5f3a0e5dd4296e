"""Prefect tasks over the `pixelpick` library.

Importing this package pins every store to the project unless the environment says otherwise: Prefect's database
in data/prefect and MLflow's in data/mlflow.db. Without it a served flow, started in another working directory,
would silently write to a new MLflow database there. Telemetry is off: the machines running
this may have no network.
"""

import os
from pathlib import Path

_DATA = Path(__file__).resolve().parents[1] / "data"
os.environ.setdefault("PREFECT_HOME", str(_DATA / "prefect"))
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_DATA / 'mlflow.db'}")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Logging a round's model reloads it to check its input example: a progress bar of that local copy is noise in a
# round's log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
