"""Hyperparameter sweeps: an Optuna study over dotted config keys, one nested MLflow run per trial.

    experiments/sweeps/NAME.yaml -> SweepSpec -> study (storage) -> trial: load_config(base, its values)
                                                                           -> prepare -> train (pruned on validation)
    MLflow: one parent run per study  <-  one nested run per trial (tags optuna_study, optuna_trial)

A sweep file holds one top-level key, `sweep:` (see `SweepSpec`, every key with a comment). Each trial
resolves the base config with its suggested values and `sweep.set`, trains as `<study>-trial<N>` into
`<output_dir>/sweeps/<study>/`, reports its validation accuracy to the pruner after every evaluation and
returns the best one. The study lives in an Optuna storage (`make_storage`): SQLite `optuna.db` by
default, any RDB URL, or a journal file. Running the same sweep again resumes the study: `n_trials`
is the number of finished trials (COMPLETE + PRUNED) the study aims for, so only the missing ones run;
a FAIL trial does not count and is made up for. The study keeps the parent MLflow run id in its user
attributes, and every trial its MLflow run id, checkpoint and worker (host:pid), so re-runs and parallel
workers share one parent run. A worker that picks up a dead worker's trial (heartbeat, RDB storages) re-runs
it as a new trial and marks the dead attempt's MLflow run FAILED.
"""
import json
import math
import os
import socket
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
import yaml
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from pydantic import Field, ValidationError, field_validator, model_validator

from lab import trainer
from lab.config import Section, load_config, parse_set, plain_name, read_yaml
from lab.errors import UserError
from lab.tracking import Tracker, check_reachable, database_url, experiment_id, resolve_uri, run_context_tags

DEFAULT_STORAGE = "sqlite:///optuna.db"
JOURNAL_SUFFIXES = (".log", ".jsonl")
PARENT_RUN_ATTR = "mlflow_parent_run_id"
PARENT_WAIT_S = 30  # how long a worker waits for the parent run of a new study that another worker created
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that count towards n_trials
PER_TRIAL_KEYS = {"run_name": "set by the sweep for each trial", "seeds": "a sweep trains each trial once"}
PER_STUDY_KEYS = {"experiment", "tracking_uri", "output_dir"}  # one parent run and folder for the whole study


# --- the sweep file ---------------------------------------------------------------------------------

class FloatSpace(Section):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False                    # sample on a log scale (low > 0)
    step: Optional[float] = Field(None, gt=0)  # a discretised float (not with log)

    @model_validator(mode="after")
    def check_range(self):
        _check_range(self.low, self.high, self.log, self.step)
        return self


class IntSpace(Section):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def check_range(self):
        _check_range(self.low, self.high, self.log, self.step if self.step != 1 else None)
        return self


class CategoricalSpace(Section):
    type: Literal["categorical"]
    choices: list[Union[None, bool, int, float, str]] = Field(min_length=1)  # what Optuna can store


def _check_range(low, high, log, step):
    if low > high:
        raise ValueError("low > high")
    if log and low <= 0:
        raise ValueError("log scale needs low > 0")
    if log and step:
        raise ValueError("step and log cannot be combined")


Param = Annotated[Union[FloatSpace, IntSpace, CategoricalSpace], Field(discriminator="type")]


class SamplerSpec(Section):
    name: Literal["tpe", "random"] = "tpe"
    seed: Optional[int] = 0              # null: unseeded; a resumed study uses seed + its number of trials
    n_startup_trials: int = Field(10, ge=0)  # tpe: random trials before the model takes over

    @model_validator(mode="after")
    def only_tpe_options(self):
        if self.name != "tpe" and "n_startup_trials" in self.model_fields_set:
            raise ValueError("n_startup_trials is a tpe option")
        return self


PRUNER_OPTIONS = {"median": {"n_startup_trials", "n_warmup_steps", "interval_steps"},
                  "hyperband": {"min_resource", "max_resource", "reduction_factor"}, "none": set()}


class PrunerSpec(Section):
    """The pruner's step is the epoch of a validation (comparable when batch sizes differ)."""
    name: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(5, ge=0)   # median: COMPLETE trials before anything is pruned
    n_warmup_steps: int = Field(0, ge=0)     # median: epochs a trial trains before it can be pruned
    interval_steps: int = Field(1, ge=1)     # median: epochs between pruning checks
    min_resource: int = Field(1, ge=1)       # hyperband: epochs every trial gets
    max_resource: Union[int, Literal["auto"]] = "auto"  # hyperband: epochs of a full trial
    reduction_factor: int = Field(3, ge=2)   # hyperband: 1/reduction_factor of trials go on to the next rung

    @model_validator(mode="after")
    def only_own_options(self):
        foreign = sorted(self.model_fields_set - PRUNER_OPTIONS[self.name] - {"name"})
        if foreign:
            raise ValueError(f"{', '.join(foreign)}: not an option of the {self.name} pruner")
        return self


class HeartbeatSpec(Section):
    """RDB storages only: a worker that dies leaves its trial RUNNING; the heartbeat turns it into FAIL."""
    interval: int = Field(60, ge=1)          # seconds between a running trial's heartbeats
    grace_period: Optional[int] = Field(None, ge=1)  # seconds of silence before FAIL (null: 2 x interval)
    max_retry: int = Field(2, ge=0)          # a trial failed that way is re-run with its parameters this often


class SweepSpec(Section):
    base: str                                # the experiment config, relative to the sweep file
    study_name: Optional[str] = None         # default: the sweep file's stem
    storage: Optional[str] = None            # null: sqlite:///optuna.db in the working directory (see make_storage)
    metric: Literal["val_accuracy"] = "val_accuracy"  # a trial's value: its best validation accuracy
    direction: Literal["maximize", "minimize"] = "maximize"
    n_trials: int = Field(20, ge=1)          # finished (COMPLETE + PRUNED) trials the study aims for, in total
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    heartbeat: HeartbeatSpec = HeartbeatSpec()
    space: dict[str, Param] = Field(min_length=1)  # dotted config key -> its search range
    set: dict[str, Any] = {}                 # fixed dotted overrides for every trial
    check_study_name = field_validator("study_name")(plain_name)  # it names the trials' run folders


class SweepFile(Section):
    sweep: SweepSpec


@dataclass
class Sweep:
    """A validated sweep: its spec and everything resolved from it."""
    spec: SweepSpec
    path: Path                # the sweep file
    base: Path                # the experiment config it searches over
    fixed: list               # "key=value" overrides for every trial (sweep.set, then --set)
    study_name: str
    storage: str              # as given (relative paths: the working directory)
    storage_where: str        # where the storage was named, for errors
    n_trials: int
    config: object            # the base config with the fixed overrides (experiment, tracking, output_dir)


def load_sweep(path, overrides=(), n_trials=None, storage=None):
    """Read and check a sweep file: schema, base config, and every search range against the base's schema."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        spec = SweepFile.model_validate(raw).sweep
    except ValidationError as e:
        raise _user_error(e, raw, path) from None
    if n_trials is not None and n_trials < 0:
        raise UserError("--n-trials", f"expected a number >= 0, got {n_trials}")
    base = (path.parent / spec.base).resolve()
    if not base.is_file():
        raise UserError(path, f"sweep.base: {base} not found")
    for key in list(spec.space) + list(spec.set):
        section = "space" if key in spec.space else "set"
        if key in PER_TRIAL_KEYS:
            raise UserError(path, f"sweep.{section}.{key}: {PER_TRIAL_KEYS[key]}")
        if section == "space" and key in PER_STUDY_KEYS:
            raise UserError(path, f"sweep.space.{key}: one value for the whole study (use sweep.set)")
    for key in spec.space.keys() & spec.set.keys():
        raise UserError(path, f"sweep.set.{key}: also in sweep.space")
    fixed = [_override(k, v) for k, v in spec.set.items()] + list(overrides)
    for assignment in overrides:
        if assignment.partition("=")[0] in spec.space:
            raise UserError("--set", f"{assignment.partition('=')[0]}: searched by the sweep (sweep.space)")
    config = _check_config(path, base, fixed, {}, "sweep.set" + (" / --set" if overrides else ""))
    # every range end and every choice must make a valid config: a typo fails now, not at trial 7
    for key, param in spec.space.items():
        for value in _values(param):
            _check_config(path, base, fixed, {key: value}, f"sweep.space.{key}")
    _check_config(path, base, fixed, {k: _values(p)[0] for k, p in spec.space.items()}, "sweep.space")
    return Sweep(spec=spec, path=path, base=base, fixed=fixed, study_name=spec.study_name or path.stem,
                 storage=storage or spec.storage or DEFAULT_STORAGE,
                 storage_where="--storage" if storage else f"{path}: sweep.storage",
                 n_trials=spec.n_trials if n_trials is None else n_trials, config=config)


def to_yaml(sweep):
    """The resolved sweep as a sweep file (what --dry-run prints and the parent run keeps as sweep.yaml)."""
    spec = sweep.spec.model_dump(mode="json")
    spec.update(base=str(sweep.base), study_name=sweep.study_name, storage=display_storage(sweep.storage),
                n_trials=sweep.n_trials, set=dict(_parsed(a) for a in sweep.fixed))
    spec["space"] = {k: {f: v for f, v in p.items() if v is not None} for k, p in spec["space"].items()}
    own = PRUNER_OPTIONS[sweep.spec.pruner.name] | {"name"}
    spec["pruner"] = {k: v for k, v in spec["pruner"].items() if k in own}
    if sweep.spec.sampler.name != "tpe":
        del spec["sampler"]["n_startup_trials"]
    return yaml.safe_dump({"sweep": spec}, sort_keys=False)


def _parsed(assignment):
    keys, value = parse_set(assignment)
    return ".".join(keys), value


def _values(param):
    return param.choices if param.type == "categorical" else [param.low, param.high]


def _override(key, value):
    """A `--set` assignment whose value reads back as exactly `value` (1e-05 must stay a float)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("\n...\n").strip()
    return f"{key}={text}"


def _check_config(path, base, fixed, values, where):
    try:
        return load_config(base, fixed + [_override(k, v) for k, v in values.items()])
    except UserError as e:
        if e.where != "--set":
            raise  # the base config's own fault: its message names its file
        detail = str(e).removeprefix("--set: ")
        if len(values) == 1:
            (key, value), = values.items()
            detail = detail.removeprefix(f"{key}: ")
            if "unknown key" not in detail:
                detail = f"{value!r} gives an invalid config: {detail}"
        raise UserError(path, f"{where}: {detail}") from None


def _user_error(error, raw, path):
    """A pydantic error as one line `file: sweep.space.train.lr: low > high`."""
    first = error.errors()[0]
    loc, node = [], raw
    for part in first["loc"]:
        if isinstance(node, dict) and part not in node and part in (node.get("type"), node.get("name")):
            continue  # a tagged union's tag, not a key
        loc.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    kind = first["type"]
    if kind == "extra_forbidden":
        message = "unknown key (a typo?)"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        message = "type: expected float, int or categorical"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if "input" in first and kind not in ("missing", "value_error"):
            message += f" (got {first['input']!r})"
    return UserError(path, f"{'.'.join(loc)}: {message}")


# --- storage, sampler, pruner -----------------------------------------------------------------------

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


def display_storage(spec):
    """The storage as others can open it: absolute file paths, no password."""
    spec = spec or DEFAULT_STORAGE
    if spec.startswith("journal:") or (spec.endswith(JOURNAL_SUFFIXES) and "://" not in spec):
        return str(Path(spec.removeprefix("journal:")).expanduser().resolve())
    if spec.startswith("sqlite:///") and not spec.startswith("sqlite:////") and spec != "sqlite:///:memory:":
        return "sqlite:///" + str(Path(spec.removeprefix("sqlite:///")).expanduser().resolve())
    try:
        return sqlalchemy.engine.make_url(spec).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return spec


def make_sampler(spec, offset=0):
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
              "sampler": make_sampler(sweep.spec.sampler, offset), "pruner": make_pruner(sweep.spec.pruner)}
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


# --- MLflow: the parent run -------------------------------------------------------------------------

def parent_run(study, sweep, client, created=True, wait=PARENT_WAIT_S):
    """The study's parent run: the one its user attrs name, else a new one (the first stored id wins).

    Workers starting at once on a new study: the one that created it creates the parent run, the others
    wait for its id (setting a user attr is not atomic: two could each store their own)."""
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    deadline = time.monotonic() + wait
    while not (run_id or created or study.get_trials(deepcopy=False)) and time.monotonic() < deadline:
        time.sleep(0.5)
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id:
        try:
            if client.get_run(run_id).info.lifecycle_stage == "active":
                client.update_run(run_id, status="RUNNING")
                return run_id
        except MlflowException:
            pass  # the study outlived its MLflow store: start a new parent run
    run = client.create_run(experiment_id(client, sweep.config.experiment), run_name=sweep.study_name,
                            tags=run_context_tags({
                                "optuna_study": sweep.study_name, "optuna_storage": display_storage(sweep.storage),
                                "sweep_file": str(sweep.path), "base_config": str(sweep.base),
                                "metric": sweep.spec.metric, "direction": sweep.spec.direction}))
    client.log_text(run.info.run_id, to_yaml(sweep), "sweep.yaml")
    if study.user_attrs.get(PARENT_RUN_ATTR) in (None, run_id):
        study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
    stored = study.user_attrs[PARENT_RUN_ATTR]
    if stored != run.info.run_id:  # another worker got there first
        client.delete_run(run.info.run_id)
        client.update_run(stored, status="RUNNING")
    return stored


def finish_parent(study, client, run_id, status="FINISHED"):
    """The study so far on the parent run: trial counts and the best trial (metrics step: finished trials)."""
    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    finished, now = counts["COMPLETE"] + counts["PRUNED"], int(time.time() * 1000)
    metrics = {f"trials_{state.lower()}": counts[state] for state in ("COMPLETE", "PRUNED", "FAIL")}
    tags = {}
    best = best_trial(study)
    if best is not None:
        metrics["best_value"] = best.value
        tags = {"best_trial": best.number, "best_params": json.dumps(best.params),
                "best_run_id": best.user_attrs.get("mlflow_run_id") or "",
                "best_checkpoint": best.user_attrs.get("checkpoint") or ""}
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, finished) for k, v in metrics.items()],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])
    client.set_terminated(run_id, status=status)


def best_trial(study):
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None


# --- trials -----------------------------------------------------------------------------------------

class TrialTracker(Tracker):
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
    config = load_config(sweep.base, sweep.fixed + [_override(k, v) for k, v in params.items()])
    return config.model_copy(update={"run_name": f"{sweep.study_name}-trial{number}",
                                     "output_dir": str(Path(config.output_dir) / "sweeps" / sweep.study_name)})


def epoch_of(step, setup):
    """The epoch a validation at `step` closes: the pruner's step, the same for every batch size.

    The trainer's steps per epoch for one process (a trial trains in one process)."""
    tc = setup.config.train
    return math.ceil(step / max(len(setup.data.images) // (tc.batch_size * tc.grad_accum), 1))


def one_line(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:500]


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
    try:
        client.log_batch(run_id, tags=[RunTag("optuna_state", "FAIL"), RunTag("optuna_retried_as", str(trial.number)),
                                       RunTag("failure", reason)])
        client.set_terminated(run_id, status="FAILED")
    except MlflowException:
        pass  # deleted meanwhile: nothing to mark


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
            setup = trainer.prepare(config, sweep.path, device)

            def on_validation(step, accuracy):
                tracker.flush()  # the curve so far on the MLflow run, should this worker die before the end
                trial.set_user_attr("checkpoint", str((setup.out_dir / "best.pt").resolve()))  # written by now
                epoch = epoch_of(step, setup)
                trial.report(accuracy, epoch)
                if trial.should_prune():
                    tracker.set_tags({"pruned": "true", "pruned_at_epoch": epoch, "pruned_at_step": step})
                    raise trainer.Stop(f"pruned at epoch {epoch} (step {step}, {sweep.spec.metric} {accuracy:.4f})")

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
        return summary["best_val_accuracy"]
    return objective


# --- the whole sweep --------------------------------------------------------------------------------

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


def dead_worker_reason(worker):
    return f"worker {worker or '?'} stopped sending heartbeats"


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
