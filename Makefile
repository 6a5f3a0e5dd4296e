# The README's two commands: `make run` (set up, then run a campaign on the bundled default data) and `make test`
# (set up, lint, then run the tests). Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(CURDIR)/$(VENV)/bin

# Store locations (Prefect, MLflow) default to data/: see tasks/__init__.py.

.PHONY: run test lint setup clean repro
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

run: setup
	$(BIN)/pixelpick campaign

# Reproduce the rounds with DVC: the top-level dvc.yaml is pointed at the default campaign (the bundled demo, whose
# folder git ignores), then every pipeline runs, every versioned campaign's too (stages call `pixelpick`, so the
# environment's bin comes first).
repro: setup
	$(BIN)/pixelpick pipeline
	PATH=$(BIN):$$PATH $(BIN)/dvc repro --all-pipelines

lint: setup
	$(BIN)/ruff check .

# One pytest-xdist worker per core, at most 4 (each loads torch, Prefect and MLflow, and starts servers); worksteal: the
# few long end-to-end tests do not leave a worker idle.
test: lint
	$(PY) -m pytest -n auto --maxprocesses 4 --dist worksteal

clean:
	rm -rf data/runs/*/rounds data/prefect data/mlflow.db data/mlartifacts data/cache
