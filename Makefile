# The README's two commands: `make run` (set up, then run a campaign on the bundled default data)
# and `make test` (set up, then run the tests). Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Store locations (Prefect, MLflow) default to data/: see tasks/__init__.py.

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
