"""The whole sweep: open (or resume) the study, its parent run, run the missing trials, summarise."""
import sys
from collections import Counter

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from lab.sweeps.parent import best_trial, finish_parent, parent_run
from lab.sweeps.schema import load_sweep
from lab.sweeps.storage import open_study
from lab.sweeps.trials import dead_worker_reason, make_objective
from lab.stores import check_reachable, display_storage, resolve_uri

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that count towards n_trials


def run(path, *, n_trials=None, storage=None, overrides=(), device=None, log=print):
    """Run (or resume) a sweep until the study holds `n_trials` finished trials; a summary dict."""
    sweep = load_sweep(path, overrides, n_trials=n_trials, storage=storage)
    check_reachable(resolve_uri(sweep.config.tracking_uri))
    study, created = open_study(sweep)
    client = MlflowClient(tracking_uri=resolve_uri(sweep.config.tracking_uri))
    parent_run_id = parent_run(study, sweep, client, created)
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    missing = max(sweep.n_trials - done, 0)
    if missing:
        log(f"study {sweep.study_name}: {done} finished trials of {sweep.n_trials}; running {missing}")
    ran, status = [], "KILLED"
    try:
        if missing:
            # other workers may finish trials meanwhile: stop once the study as a whole has enough
            enough = optuna.study.MaxTrialsCallback(sweep.n_trials, states=FINISHED)
            # Optuna's own bar: trials done and the best value so far (on a terminal only, not in logs)
            study.optimize(make_objective(sweep, parent_run_id, device, log), n_trials=missing, catch=(Exception,),
                           callbacks=[enough, lambda _, trial: ran.append(trial.number)], gc_after_trial=True,
                           show_progress_bar=sys.stderr.isatty())
        status = "FINISHED"
    finally:
        finish_parent(study, client, parent_run_id, status)
    return summarize(study, sweep, parent_run_id, new_trials=len(ran))


def summarize(study, sweep, parent_run_id, new_trials):
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    return {
        "study_name": sweep.study_name, "storage": display_storage(sweep.storage), "target": sweep.n_trials,
        "new_trials": new_trials, "states": dict(Counter(t.state.name for t in trials)),
        "parent_run_id": parent_run_id, "experiment": sweep.config.experiment, "metric": sweep.spec.metric,
        "best": None if best is None else {
            "number": best.number, "value": best.value, "params": best.params,
            "run_id": best.user_attrs.get("mlflow_run_id"), "checkpoint": best.user_attrs.get("checkpoint")},
        "failures": {t.number: t.user_attrs.get("failure") or dead_worker(t, trials)
                     for t in trials if t.state == TrialState.FAIL},
        "dashboard": f"optuna-dashboard {display_storage(sweep.storage)} --host 127.0.0.1",
    }


def dead_worker(trial, trials):
    """Why a FAIL trial without a `failure` attr failed: its worker died, if a retry says so."""
    retries = [t.number for t in trials if (t.system_attrs.get("retry_history") or [None])[-1] == trial.number]
    if retries:  # RetryHeartbeatStaleTrialCallback made them: the heartbeat marked this trial FAIL
        return f"{dead_worker_reason(trial.user_attrs.get('worker'))}; retried as trial {retries[0]}"
    return f"no reason recorded (worker {trial.user_attrs.get('worker', '?')}; a dead worker after max_retry?)"


def print_summary(summary):
    states = ", ".join(f"{n} {state}" for state, n in sorted(summary["states"].items()))
    print(f"study {summary['study_name']} in {summary['storage']}: {states or 'no trials'} "
          f"(target {summary['target']} finished; {summary['new_trials']} run now)")
    print(f"MLflow parent run {summary['parent_run_id']} (experiment {summary['experiment']})")
    for number, failure in summary["failures"].items():
        print(f"trial {number} failed: {failure}")
    best = summary["best"]
    if best:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        print(f"best trial {best['number']}: {summary['metric']} {best['value']:.4f} ({params}); "
              f"MLflow run {best['run_id']}; checkpoint {best['checkpoint']}")
    print(f"dashboard: {summary['dashboard']}")
