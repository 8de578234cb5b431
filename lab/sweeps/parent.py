"""A study's MLflow parent run: which one it is (kept in the study's user attrs, so re-runs and parallel
workers share it) and the study's standing on it. lab.tracking writes it; this module only decides."""
import json
import time
from collections import Counter

from lab import tracking
from lab.sweeps.schema import sweep_yaml
from lab.stores import display_storage

PARENT_RUN_ATTR = "mlflow_parent_run_id"
PARENT_WAIT_S = 30  # how long a worker waits for the parent run of a new study that another worker created


def parent_run(study, sweep, client, created=True, wait=PARENT_WAIT_S):
    """The study's parent run: the one its user attrs name, else a new one (the first stored id wins).

    Workers starting at once on a new study: the one that created it creates the parent run, the others
    wait for its id (setting a user attr is not atomic: two could each store their own)."""
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    deadline = time.monotonic() + wait
    while not (run_id or created or study.get_trials(deepcopy=False)) and time.monotonic() < deadline:
        time.sleep(0.5)
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id and tracking.reopen_parent_run(client, run_id):
        return run_id
    # none yet, or the study outlived its MLflow store: a new parent run
    new_id = tracking.create_parent_run(
        client, sweep.config.experiment, sweep.study_name, sweep_yaml(sweep),
        {"optuna_study": sweep.study_name, "optuna_storage": display_storage(sweep.storage),
         "sweep_file": str(sweep.path), "base_config": str(sweep.base), "metric": sweep.spec.metric,
         "direction": sweep.spec.direction})
    if study.user_attrs.get(PARENT_RUN_ATTR) in (None, run_id):
        study.set_user_attr(PARENT_RUN_ATTR, new_id)
    stored = study.user_attrs[PARENT_RUN_ATTR]
    if stored != new_id:  # another worker got there first
        tracking.discard_run(client, new_id)
        tracking.reopen_parent_run(client, stored)
    return stored


def finish_parent(study, client, run_id, status="FINISHED"):
    """The study so far on the parent run: trial counts and the best trial (metrics step: finished trials)."""
    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    metrics = {f"trials_{state.lower()}": counts[state] for state in ("COMPLETE", "PRUNED", "FAIL")}
    tags = {}
    best = best_trial(study)
    if best is not None:
        metrics["best_value"] = best.value
        tags = {"best_trial": best.number, "best_params": json.dumps(best.params),
                "best_run_id": best.user_attrs.get("mlflow_run_id") or "",
                "best_checkpoint": best.user_attrs.get("checkpoint") or ""}
    tracking.finish_parent_run(client, run_id, metrics, tags, counts["COMPLETE"] + counts["PRUNED"], status)


def best_trial(study):
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None
