"""Hyperparameter sweeps: an Optuna study over dotted config keys, one nested MLflow run per trial.

    experiments/sweeps/NAME.yaml -> schema.load_sweep -> storage.open_study -> parent.parent_run (MLflow)
        -> trials.make_objective: load_config(base, its values) -> build.prepare -> trainer.train (pruned)

    study.py    the whole sweep: run (or resume) it, summarise it
    schema.py   the sweep file: SweepSpec, load_sweep, sweep_yaml (no torch: --dry-run loads only this)
    storage.py  the Optuna storage, the study, its sampler and pruner
    parent.py   which MLflow run is the study's parent, and the study's standing on it
    trials.py   one trial: config, training run, pruning, a dead worker's attempt marked FAILED

Running the same sweep again resumes the study: `n_trials` is the number of finished trials (COMPLETE +
PRUNED) the study aims for, so only the missing ones run; a FAIL trial does not count and is made up
for. The study keeps the parent MLflow run id in its user attributes, and every trial its MLflow run id,
checkpoint and worker (host:pid), so re-runs and parallel workers share one parent run. A worker that
picks up a dead worker's trial (heartbeat, RDB storages) re-runs it as a new trial.
"""
