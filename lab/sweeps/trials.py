"""One trial of a sweep: its values suggested by Optuna, its config, a training run nested under the study's
parent run, reported to the pruner after every validation (the trainer's epoch is the pruner's step).
A trial that retries a dead worker's trial first marks that attempt's MLflow run FAILED.
"""
import json
import os
import socket
import warnings
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from lab import build, tracking, trainer
from lab.config import load_config
from lab.sweeps.schema import as_override
from lab.stores import display_storage, resolve_uri
from lab.sweeps.storage import one_line


class TrialTracker(tracking.Tracker):
    """A Tracker that gives the Optuna trial its MLflow run id as soon as the run exists."""

    def __init__(self, uri, trial):
        super().__init__(uri)
        self.trial = trial

    def start(self, *args, **kwargs):
        run_id = super().start(*args, **kwargs)
        self.trial.set_user_attr("mlflow_run_id", run_id)
        return run_id


def suggest(trial, key, param):
    if param.type == "float":
        return trial.suggest_float(key, param.low, param.high, log=param.log, step=param.step)
    if param.type == "int":
        return trial.suggest_int(key, param.low, param.high, step=param.step, log=param.log)
    return trial.suggest_categorical(key, param.choices)


def trial_config(sweep, number, params):
    """The base config with the trial's values; its own run name, all trials under one folder."""
    config = load_config(sweep.base, sweep.fixed + [as_override(k, v) for k, v in params.items()])
    return config.model_copy(update={"run_name": f"{sweep.study_name}-trial{number}",
                                     "output_dir": str(Path(config.output_dir) / "sweeps" / sweep.study_name)})


def retry_history(trial):
    """The trials a dead worker left behind that this one re-runs (RetryHeartbeatStaleTrialCallback), oldest
    first: [] for a first attempt; [0] for the retry of trial 0, [0, 5] for the retry of its retry 5."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                  if t.number == trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retry_history(frozen)


def fail_dead_attempt(client, trial):
    """The MLflow run of the trial a dead worker left behind (still RUNNING there): FAILED, naming its retry.

    `trial`, the retry, inherited the dead trial's user attrs: its run id and worker."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return  # the worker died before the run existed
    reason = f"{dead_worker_reason(trial.user_attrs.get('worker'))}; retried as trial {trial.number}"
    tracking.fail_run(client, run_id, {"optuna_state": "FAIL", "optuna_retried_as": trial.number, "failure": reason})


def dead_worker_reason(worker):
    return f"worker {worker or '?'} stopped sending heartbeats"


def make_objective(sweep, parent_run_id, device=None, log=print):
    def objective(trial):
        params = {key: suggest(trial, key, param) for key, param in sweep.spec.space.items()}
        worker = f"{socket.gethostname()}:{os.getpid()}"  # which machine and process runs it (and died, if so)
        tags = {"optuna_study": sweep.study_name, "optuna_trial": str(trial.number),
                "optuna_params": json.dumps(params), "optuna_storage": display_storage(sweep.storage),
                "optuna_worker": worker}
        tracker = TrialTracker(resolve_uri(sweep.config.tracking_uri), trial)
        retried = retry_history(trial)
        if retried:  # it inherited the dead trial's user attrs: close that attempt's run, drop what belongs to it
            tags["optuna_retry_of"] = str(retried[0])
            fail_dead_attempt(tracker.client, trial)
            for key in ("checkpoint", "failure", "mlflow_run_id"):
                trial.set_user_attr(key, None)
        trial.set_user_attr("worker", worker)
        config = trial_config(sweep, trial.number, {})  # what the MLflow run describes if the values do not fit
        try:
            config = trial_config(sweep, trial.number, params)
            setup = build.prepare(config, sweep.path, device, fresh=True)

            def on_validation(step, epoch, metrics):
                """The pruner's step is the trainer's epoch: the same for every batch size and world size."""
                value = metrics[sweep.spec.metric]
                tracker.flush()  # the curve so far on the MLflow run, should this worker die before the end
                trial.set_user_attr("checkpoint", str((setup.out_dir / "best.pt").resolve()))  # written by now
                trial.report(value, epoch)
                if trial.should_prune():
                    tracker.set_tags({"pruned": "true", "pruned_at_epoch": epoch, "pruned_at_step": step})
                    raise trainer.Stop(f"pruned at epoch {epoch} (step {step}, {sweep.spec.metric} {value:.4f})")

            summary = trainer.train(setup, tracker=tracker, parent_run_id=parent_run_id, extra_tags=tags,
                                    on_validation=on_validation, fresh=True, log=log)
        except trainer.Stop as stop:  # the trainer ended the MLflow run as KILLED
            tracker.set_tags({"optuna_state": "PRUNED"})
            raise optuna.TrialPruned(str(stop)) from None
        except (Exception, KeyboardInterrupt) as e:
            reason = "interrupted" if isinstance(e, KeyboardInterrupt) else one_line(e)
            trial.set_user_attr("failure", reason)
            if tracker.run_id is None:  # failed before training: still one MLflow run per trial, marked failed
                tracker.start(config, sweep.path, parent_run_id=parent_run_id, extra_tags=tags)
                tracker.set_tags({"optuna_state": "FAIL", "failure": reason})
                tracker.end("FAILED")
            else:  # the trainer ended the run as FAILED (KILLED when interrupted)
                tracker.set_tags({"optuna_state": "FAIL", "failure": reason})
            raise
        tracker.set_tags({"optuna_state": "COMPLETE"})
        return summary[f"best_{sweep.spec.metric}"]
    return objective
