# `make test` and `make demo` work on a fresh clone: they create .venv and install the pinned
# requirements when missing (or when requirements.txt changed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test test-fast demo ablations clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

demo: $(VENV)/.installed
	$(PY) run_experiment.py experiments/quickstart.yaml

clean:
	rm -rf .pytest_cache mlflow.db mlruns mlartifacts optuna.db runs
