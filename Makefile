# The README's two commands: `make run` (set up, then run a campaign on the bundled default data)
# and `make test` (set up, then run the tests). Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Every store in the project, never the user's home: Prefect's database, MLflow's tracking database.
export PREFECT_HOME ?= $(CURDIR)/data/prefect
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/data/mlflow.db
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_RESULTS_PERSIST_BY_DEFAULT := true
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: run test setup clean repro
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: setup
	$(PY) -m flows.campaign

# Reproduce the campaign's rounds with DVC (stages call `python`, so the environment's bin comes first).
repro: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

test: setup
	$(PY) -m pytest

clean:
	rm -rf data/runs data/prefect data/mlflow.db data/mlartifacts
