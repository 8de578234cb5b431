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

# The whole ablation suite at GPU scale (base + every file in experiments/ablations/, over SEEDS),
# then the table and charts. Re-running resumes interrupted runs and skips finished ones.
SEEDS ?= 0 1 2
ablations: $(VENV)/.installed
	$(PY) run_experiment.py experiments/base.yaml --seeds $(SEEDS)
	for f in experiments/ablations/*.yaml; do $(PY) run_experiment.py $$f --seeds $(SEEDS) || exit 1; done
	$(PY) compare.py --experiment iclevr-ablations --charts

clean:
	rm -rf .pytest_cache mlflow.db mlruns mlartifacts optuna.db runs
