"""Where a study lives: an Optuna storage from one string (`make_storage`), the study opened or created in it
with its sampler and pruner (`open_study`). Several workers may share one storage: exactly one of them
creates the study, the others load it.
"""
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from lab.errors import UserError
from lab.stores import DEFAULT_STORAGE, JOURNAL_SUFFIXES, check_reachable, database_url, display_storage, resolve_uri

def make_storage(url_or_path=None, *, heartbeat_interval=60, grace_period=None, max_retry=2, where="storage"):
    """An Optuna storage from one string; the same for a single run and for workers sharing a study.

    `sqlite:///optuna.db`, `postgresql://user:pw@host/db`, `mysql+pymysql://...`: RDBStorage with a
    heartbeat, so a trial whose worker died becomes FAIL and is retried (RetryHeartbeatStaleTrialCallback).
    `PATH.log`, `PATH.jsonl` or `journal:PATH`: JournalStorage on a file (no heartbeat).
    """
    spec = url_or_path or DEFAULT_STORAGE
    if spec.startswith("journal:") or (spec.endswith(JOURNAL_SUFFIXES) and "://" not in spec):
        path = Path(spec.removeprefix("journal:")).expanduser()
        if not path.parent.is_dir():
            raise UserError(where, f"folder {path.parent.resolve()} of the journal file {path} does not exist")
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in spec:
        raise UserError(where, f"{spec!r}: expected an RDB URL (sqlite:///optuna.db, postgresql://...) "
                               "or a journal file (PATH.log, PATH.jsonl, journal:PATH)")
    if spec.startswith("sqlite"):
        check_reachable(spec, where)  # the folder must exist
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several processes (or heartbeats) may write at once
    else:
        engine_kwargs = {"pool_pre_ping": True}  # survive a database server restart between trials
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # heartbeats and retries have been "experimental" since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(database_url(spec), engine_kwargs=engine_kwargs,
                                  heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry))
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            # workers starting at once on an empty database race to create Optuna's tables (PostgreSQL:
            # "duplicate key ... pg_type_typname_nsp_index", "relation ... already exists"): the loser retries
            error = e
            time.sleep(0.5 * (attempt + 1))
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
            error = e
            break
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise UserError(where, f"cannot open the Optuna storage {display_storage(spec)} ({message})") from None


def make_optuna_sampler(spec, offset=0):
    """The seed moves by `offset` (trials already in the study) so a resumed study does not repeat itself."""
    seed = None if spec.seed is None else spec.seed + offset
    if spec.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.n_startup_trials)


def make_pruner(spec):
    if spec.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps,
                                           interval_steps=spec.interval_steps)
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.min_resource, max_resource=spec.max_resource,
                                              reduction_factor=spec.reduction_factor)
    return optuna.pruners.NopPruner()


def open_study(sweep):
    """Create the study, or load it when it exists (re-runs and other workers): (study, whether this created it)."""
    hb = sweep.spec.heartbeat
    storage = make_storage(sweep.storage, heartbeat_interval=hb.interval, grace_period=hb.grace_period,
                           max_retry=hb.max_retry, where=sweep.storage_where)
    try:
        existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    except sqlalchemy.exc.SQLAlchemyError as e:  # a server that went away after the storage was built
        raise UserError(sweep.storage_where, f"cannot read the Optuna storage {display_storage(sweep.storage)} "
                                             f"({one_line(e)})") from None
    offset = existing[sweep.study_name].n_trials if sweep.study_name in existing else 0
    kwargs = {"storage": storage, "study_name": sweep.study_name, "direction": sweep.spec.direction,
              "sampler": make_optuna_sampler(sweep.spec.sampler, offset), "pruner": make_pruner(sweep.spec.pruner)}
    try:  # of workers starting at once, exactly one creates the study (the storage's unique study name)
        study, created = optuna.create_study(**kwargs), True
    except optuna.exceptions.DuplicatedStudyError:
        study, created = optuna.create_study(**kwargs, load_if_exists=True), False
    if study.direction.name.lower() != sweep.spec.direction:
        raise UserError(sweep.path, f"sweep.direction: study {sweep.study_name!r} in {display_storage(sweep.storage)} "
                                    f"was created to {study.direction.name.lower()}; use another study_name")
    for key, value in {"sweep_file": str(sweep.path.resolve()), "base_config": str(sweep.base),
                       "metric": sweep.spec.metric, "mlflow_experiment": sweep.config.experiment,
                       "mlflow_tracking_uri": display_storage(resolve_uri(sweep.config.tracking_uri))}.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    if study.metric_names is None:  # optuna-dashboard labels its plots with it instead of "Objective 0"
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([sweep.spec.metric])
    return study, created



def one_line(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:500]
