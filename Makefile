# `make test` and `make demo` work on a fresh clone: they create .venv and install exactly the versions in
# requirements.lock, then this package (editable, its entry points on .venv/bin), when missing or when the
# lock or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test test-fast demo ablations lock clean

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Regenerate requirements.lock after changing a dependency in pyproject.toml: every package, transitive ones
# included, pinned for every platform (markers); versions already in the lock are kept where they still fit.
lock: $(VENV)/.installed
	$(PY) -m uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 -o requirements.lock

test: $(VENV)/.installed
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

demo: $(VENV)/.installed
	$(PY) run_experiment.py experiments/quickstart.yaml

# The whole ablation suite (base + every file in experiments/ablations/, over SEEDS) on the preset BASE
# (base.yaml: GPU scale; experiments/cpu_suite.yaml: the CPU scale, about two hours on 2 cores), then the table
# and charts of that preset's MLflow experiment. Re-running resumes interrupted runs and skips finished ones;
# an ablation that changes nothing on BASE is skipped, and one that changes only sampling reuses the training.
# JOBS runs that many at a time, the base's seeds first (sampling-only ablations sample its weights); above two,
# point MLFLOW_TRACKING_URI at an `mlflow server`, as SQLite takes one writer at a time. ARGS go to every run.
SEEDS ?= 0 1 2
BASE ?= experiments/base.yaml
JOBS ?= 1
ARGS ?=
ablations: $(VENV)/.installed
	printf '%s\n' $(SEEDS) | xargs -P $(JOBS) -I{} $(PY) run_experiment.py $(BASE) --seeds {} $(ARGS)
	for f in experiments/ablations/*.yaml; do for s in $(SEEDS); do echo $$f $$s; done; done | \
	  xargs -P $(JOBS) -L 1 sh -c '$(PY) run_experiment.py "$$0" --base $(BASE) --seeds "$$1" $(ARGS)'
	$(PY) compare.py --experiment "$$($(PY) run_experiment.py $(BASE) --dry-run | sed -n 's/^experiment: //p')" --charts

clean:
	rm -rf .pytest_cache *.egg-info mlflow.db mlruns mlartifacts optuna.db runs
